"""Politics, Thomas & Kovashka, NeurIPS 2019: news images labelled by their outlet's leaning."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
import vise_tfds_common as common

CLASSES = ('left', 'right')
LABEL_ALIASES = {'left': 'left', 'l': 'left', 'right': 'right', 'r': 'right'}
SPLIT_ALIASES = {'train': 'train', 'val': 'val', 'validation': 'val', 'test': 'test'}
ANNOTATIONS = 'annotations.csv'
# Without a split column (or split lists): 80% / 10% / 10% by a hash of the image id.
FRACTIONS = {'train': 0.8, 'val': 0.1, 'test': 0.1}

_CITATION = """\
@inproceedings{thomas2019predicting,
  title={Predicting the Politics of an Image Using Webly Supervised Data},
  author={Thomas, Christopher and Kovashka, Adriana},
  booktitle={NeurIPS},
  year={2019}
}"""


class Builder(common.ManualImageBuilder):
    """Politics: is an image from a left- or a right-leaning news source?"""

    SPLITS = tuple(FRACTIONS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the dataset of Thomas & Kovashka (NeurIPS 2019,
    http://people.cs.pitt.edu/~chris/politics/) and describe the images you use in a CSV:

      <manual_dir>/annotations.csv     header: image,label[,split][,source]
      <manual_dir>/<image paths as the CSV gives them, relative to the CSV>

    label: left or right (L / R accepted); split: train, val (or validation) or test; source:
    the news outlet (optional, kept as a feature). The image id is the image column. Without a
    split column, splits/train.txt, splits/val.txt and splits/test.txt beside the CSV fix the
    split, else a hash of the image id gives 80% / 10% / 10%.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description='Politics (Thomas & Kovashka, NeurIPS 2019): images from news articles,'
                        ' labelled with the political leaning of the outlet that ran them.',
            features=tfds.features.FeaturesDict({
                'image': common.image_feature(),
                'label': tfds.features.ClassLabel(names=CLASSES),
                'source': tfds.features.Text(),
                'image_id': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='http://people.cs.pitt.edu/~chris/politics/',
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _read_manual_dir(self, manual_dir: Path,
                         counts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        root = common.find_root(manual_dir, ANNOTATIONS, self.name)
        path = root / ANNOTATIONS
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for column in ('image', 'label'):
                if column not in header:
                    raise common.AnnotationError(f'{path}: no column {column!r} (header: '
                                                 f'{header})')
            has_split = 'split' in header
            records, splits, seen = [], {}, {}
            for number, row in enumerate(reader, start=2):
                where = common.at(path, number)
                image_id = (row.get('image') or '').strip()
                if not image_id:
                    raise common.AnnotationError(f"{where}: column 'image' is empty")
                if image_id in seen:
                    raise common.AnnotationError(f'{where}: {image_id!r} repeats line '
                                                 f'{seen[image_id]}')
                seen[image_id] = number
                label = (row.get('label') or '').strip()
                if label.lower() not in LABEL_ALIASES:
                    raise common.AnnotationError(f"{where}: column 'label': unknown class "
                                                 f'{label!r}; classes: {list(CLASSES)}')
                if has_split:
                    split = (row.get('split') or '').strip()
                    if split.lower() not in SPLIT_ALIASES:
                        raise common.AnnotationError(f"{where}: column 'split': unknown split "
                                                     f'{split!r}; splits: {list(FRACTIONS)}')
                    splits[image_id] = SPLIT_ALIASES[split.lower()]
                records.append({'image': common.require_image(root, image_id, where),
                                'label': LABEL_ALIASES[label.lower()],
                                'source': (row.get('source') or '').strip(),
                                'image_id': image_id})
        if not records:
            raise common.AnnotationError(f'{path}: no rows')
        if not has_split:
            return common.assign_splits(records, root, FRACTIONS, self.name, counts)
        counts['split_source'] = f"{path}: column 'split'"
        by_split: dict[str, list[dict[str, Any]]] = {split: [] for split in FRACTIONS}
        for record in records:
            by_split[splits[record['image_id']]].append(record)
        return by_split
