"""Intentonomy, Jia et al., CVPR 2021: ~14k Unsplash images, 28 human intents, multi-label."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import vise_tfds_common as common

# Category ids 0..27 of the release's annotation files, in id order.
CLASSES = (
    'Attractive', 'BeatCompete', 'Communicate', 'CreativeUnique',
    'CuriousAdventurousExcitingLife', 'EasyLife', 'EnjoyLife', 'FineDesignLearnArt-Arch',
    'FineDesignLearnArt-Art', 'FineDesignLearnArt-Culture', 'GoodParentEmoCloseChild', 'Happy',
    'HardWorking', 'Harmony', 'Health', 'InLove', 'InLoveAnimal', 'InspirOthrs',
    'ManagableMakePlan', 'NatBeauty', 'PassionAbSmthing', 'Playful', 'ShareFeelings',
    'SocialLifeFriendship', 'SuccInOccupHavGdJob', 'TchOthrs', 'ThngsInOrdr', 'WorkILike',
)
SPLITS = ('train', 'val', 'test')
ANNOTATION_FILE = 'intentonomy_{split}2020.json'
IMAGES = 'images'

_CITATION = """\
@inproceedings{jia2021intentonomy,
  title={Intentonomy: a Dataset and Study towards Human Intent Understanding},
  author={Jia, Menglin and Wu, Zuxuan and Reiter, Austin and Cardie, Claire and
          Belongie, Serge and Lim, Ser-Nam},
  booktitle={CVPR},
  year={2021}
}"""


class Builder(common.ManualImageBuilder):
    """Intentonomy: which of 28 intents (motives) lie behind posting an image; multi-label."""

    SPLITS = SPLITS
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Get the three annotation files of Intentonomy (Jia et al., CVPR 2021; links in DATA.md of
    https://github.com/KMnP/intentonomy) and fetch the images with the release's download
    script (--anno-root <manual_dir>/annotations --image-root <manual_dir>/images):

      <manual_dir>/annotations/intentonomy_train2020.json
      <manual_dir>/annotations/intentonomy_val2020.json
      <manual_dir>/annotations/intentonomy_test2020.json
      <manual_dir>/images/<each image's "filename" in those files, e.g. low/<hash>.jpg>

    (The JSON files may also sit directly in manual_dir.) Images that the download script could
    not fetch (Unsplash photos do get removed) are left out and counted in the dataset's
    metadata; a split none of whose images are found is an error.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description='Intentonomy (Jia et al., CVPR 2021): 28 intent categories, several per'
                        ' image. label: the intents present (train: any of the 3 annotators '
                        'chose it, i.e. softprob > 0; val/test: the released category_ids); '
                        'label_softprob: the share of annotators per intent (val/test: 1.0 for '
                        'each released label). Splits as released (the released val/test '
                        'differ from the CVPR paper\'s, see DATA.md).',
            features=tfds.features.FeaturesDict({
                'image': common.image_feature(),
                'label': tfds.features.Sequence(tfds.features.ClassLabel(names=CLASSES)),
                'label_softprob': tfds.features.Tensor(shape=(len(CLASSES),),
                                                       dtype=np.float32),
                'image_id': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://github.com/KMnP/intentonomy',
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _read_manual_dir(self, manual_dir: Path,
                         counts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        annotations = common.find_root(manual_dir, ANNOTATION_FILE.format(split='train'),
                                       self.name, depth=1)
        image_root = manual_dir / IMAGES
        if not image_root.is_dir():
            raise common.AnnotationError(f'{self.name}: image folder {image_root} not found; '
                                         'fetch the images there with the release\'s script')
        counts['missing_images'], counts['unannotated_images'] = {}, {}
        by_split = {}
        for split in SPLITS:
            path = annotations / ANNOTATION_FILE.format(split=split)
            if not path.is_file():
                raise common.AnnotationError(f'{self.name}: annotation file {path} not found')
            records, missing, unannotated = _read_split(path, image_root)
            if missing and not records:
                raise common.AnnotationError(
                    f'{path}: none of its {len(missing)} images were found under {image_root} '
                    f'(e.g. {image_root / missing[0]})')
            if missing:
                common.log.warning('%s: %s: %d of %d images are missing (left out), e.g. %s',
                                   self.name, path.name, len(missing),
                                   len(missing) + len(records), image_root / missing[0])
            counts['missing_images'][split] = len(missing)
            counts['unannotated_images'][split] = unannotated
            by_split[split] = records
        return by_split


def _read_split(path: Path, image_root: Path) -> tuple[list[dict[str, Any]], list[str], int]:
    """(records with their image found, file names of the missing ones, images unannotated)."""
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise common.AnnotationError(f'{path}: malformed JSON: {e}') from e
    for key in ('categories', 'images', 'annotations'):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise common.AnnotationError(f'{path}: no list {key!r} at the top level')
    _check_categories(path, data['categories'])

    filenames: dict[str, str] = {}
    for index, image in enumerate(data['images']):
        where = common.at(path, f'images[{index}]')
        if not isinstance(image, dict) or 'id' not in image or not image.get('filename'):
            raise common.AnnotationError(f"{where}: an image needs an 'id' and a 'filename'")
        image_id = str(image['id'])
        if image_id in filenames:
            raise common.AnnotationError(f'{where}: image id {image_id!r} repeats')
        filenames[image_id] = str(image['filename'])

    records, missing, annotated = [], [], set()
    for index, annotation in enumerate(data['annotations']):
        where = common.at(path, f'annotations[{index}]')
        if not isinstance(annotation, dict):
            raise common.AnnotationError(f'{where}: not an object')
        image_id = str(annotation.get('image_id'))
        if image_id not in filenames:
            raise common.AnnotationError(f'{where}: image_id {image_id!r} is not among the '
                                         "file's images")
        if image_id in annotated:
            raise common.AnnotationError(f'{where}: image {image_id!r} is annotated twice')
        annotated.add(image_id)
        label, softprob = _labels(where, annotation)
        filename = filenames[image_id]
        image_path = image_root / filename
        if not image_path.is_file() or image_path.stat().st_size == 0:
            missing.append(filename)
            continue
        records.append({'image': image_path, 'label': label, 'label_softprob': softprob,
                        'image_id': image_id})
    return records, missing, len(filenames) - len(annotated)


def _check_categories(path: Path, categories: list[Any]) -> None:
    names = {}
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or 'id' not in category or 'name' not in category:
            raise common.AnnotationError(f"{common.at(path, f'categories[{index}]')}: a category"
                                         " needs an 'id' and a 'name'")
        names[category['id']] = category['name']
    expected = dict(enumerate(CLASSES))
    if names != expected:
        wrong = sorted(set(names) ^ set(expected), key=str) or [
            i for i in expected if names[i] != expected[i]]
        first = wrong[0]
        raise common.AnnotationError(
            f'{path}: categories differ from the 28 Intentonomy intents, e.g. id {first!r} is '
            f'{names.get(first)!r}, expected {expected.get(first)!r}')


def _labels(where: str, annotation: dict[str, Any]) -> tuple[list[int], np.ndarray]:
    """(class ids, per-class annotator share): category_ids and/or category_ids_softprob."""
    ids = annotation.get('category_ids')
    softprob = annotation.get('category_ids_softprob')
    if ids is None and softprob is None:
        raise common.AnnotationError(f"{where}: neither 'category_ids' nor "
                                     "'category_ids_softprob'")
    shares = None
    if softprob is not None:
        if (not isinstance(softprob, list) or len(softprob) != len(CLASSES)
                or not all(isinstance(p, int | float) and math.isfinite(p) and 0 <= p <= 1
                           for p in softprob)):
            raise common.AnnotationError(f"{where}: 'category_ids_softprob' must be "
                                         f'{len(CLASSES)} numbers in [0, 1], got {softprob!r}')
        shares = np.array(softprob, np.float32)
    if ids is not None:
        if not isinstance(ids, list):
            raise common.AnnotationError(f"{where}: 'category_ids' must be a list, got {ids!r}")
        for class_id in ids:
            if (not isinstance(class_id, int) or isinstance(class_id, bool)
                    or not 0 <= class_id < len(CLASSES)):
                raise common.AnnotationError(f"{where}: 'category_ids': unknown class id "
                                             f'{class_id!r}; ids are 0..{len(CLASSES) - 1}')
        label = sorted(set(ids))
    else:
        label = [int(i) for i in np.flatnonzero(shares > 0)]
    if shares is None:
        shares = np.zeros(len(CLASSES), np.float32)
        shares[label] = 1.0
    return label, shares
