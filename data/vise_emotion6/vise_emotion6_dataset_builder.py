"""Emotion6, Peng et al., CVPR 2015: 1,980 Flickr images, 6 emotions, evoked-emotion votes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import vise_tfds_common as common

# The six search keywords, one image folder each (330 images apiece): the classification label.
CLASSES = ('anger', 'disgust', 'fear', 'joy', 'sadness', 'surprise')
# The columns of ground_truth.txt's evoked-emotion distribution, in file order.
DISTRIBUTION = ('anger', 'disgust', 'fear', 'joy', 'sadness', 'surprise', 'neutral')
GROUND_TRUTH = 'ground_truth.txt'
# No split is published: 80% train / 20% test by a hash of the image id (the probe holds out
# its own validation share of train).
FRACTIONS = {'train': 0.8, 'test': 0.2}

_CITATION = """\
@inproceedings{peng2015mixed,
  title={A Mixed Bag of Emotions: Model, Predict, and Transfer Emotion Distributions},
  author={Peng, Kuan-Chuan and Chen, Tsuhan and Sadovnik, Amir and Gallagher, Andrew C},
  booktitle={CVPR},
  year={2015}
}"""


class Builder(common.ManualImageBuilder):
    """Emotion6: the folder (search keyword) label, plus valence, arousal and vote shares."""

    SPLITS = tuple(FRACTIONS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download Emotion6.zip (Cornell, Peng et al., CVPR 2015) and unpack it into manual_dir:

      <manual_dir>/Emotion6/ground_truth.txt
      <manual_dir>/Emotion6/images/anger/1.jpg ... disgust/ fear/ joy/ sadness/ surprise/

    (manual_dir may also be the Emotion6 folder itself.) ground_truth.txt is the release's:
    a header line, then one tab-separated row per image:
    '<emotion>/<n>.jpg valence arousal p_anger p_disgust p_fear p_joy p_sadness p_surprise
    p_neutral'. The image id is the row's file name. No split is published: by default a hash
    of the image id gives 80% train / 20% test; to fix your own, add splits/train.txt and
    splits/test.txt beside ground_truth.txt, one image id a line.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description='Emotion6 (Peng et al., CVPR 2015). label: the emotion keyword the '
                        'image was found under (its folder); dominant_emotion: the most '
                        'voted of the 7 evoked emotions (ties: the first); '
                        'emotion_distribution: the vote shares in the order '
                        f'{list(DISTRIBUTION)}; valence and arousal: mean ratings (1-9).',
            features=tfds.features.FeaturesDict({
                'image': common.image_feature(),
                'label': tfds.features.ClassLabel(names=CLASSES),
                'dominant_emotion': tfds.features.ClassLabel(names=DISTRIBUTION),
                'emotion_distribution': tfds.features.Tensor(shape=(len(DISTRIBUTION),),
                                                             dtype=np.float32),
                'valence': tfds.features.Scalar(dtype=np.float32),
                'arousal': tfds.features.Scalar(dtype=np.float32),
                'image_id': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='http://chenlab.ece.cornell.edu/downloads.html',
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _read_manual_dir(self, manual_dir: Path,
                         counts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        root = common.find_root(manual_dir, GROUND_TRUTH, self.name)
        path = root / GROUND_TRUTH
        records, seen = [], {}
        for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if number == 1 and not _is_number(fields[1] if len(fields) > 1 else ''):
                continue  # the header
            where = common.at(path, number)
            if len(fields) != 3 + len(DISTRIBUTION):
                raise common.AnnotationError(
                    f'{where}: expected {3 + len(DISTRIBUTION)} fields (file, valence, arousal, '
                    f'{len(DISTRIBUTION)} probabilities), got {len(fields)}')
            image_id = fields[0]
            if image_id in seen:
                raise common.AnnotationError(f'{where}: {image_id!r} repeats line {seen[image_id]}')
            seen[image_id] = number
            emotion = image_id.split('/', 1)[0] if '/' in image_id else ''
            if emotion not in CLASSES:
                raise common.AnnotationError(
                    f'{where}: unknown class {emotion!r} (the folder of {image_id!r}); classes: '
                    f'{list(CLASSES)}')
            numbers = [_number(where, name, value) for name, value in
                       zip(('valence', 'arousal', *DISTRIBUTION), fields[1:], strict=True)]
            distribution = np.array(numbers[2:], np.float32)
            if (distribution < 0).any() or (distribution > 1).any():
                raise common.AnnotationError(f'{where}: emotion probabilities must lie in [0, 1],'
                                             f' got {numbers[2:]}')
            records.append({
                'image': common.require_image(root / 'images', image_id, where),
                'label': emotion,
                'dominant_emotion': int(np.argmax(distribution)),
                'emotion_distribution': distribution,
                'valence': numbers[0],
                'arousal': numbers[1],
                'image_id': image_id,
            })
        if not records:
            raise common.AnnotationError(f'{path}: no rows')
        return common.assign_splits(records, root, FRACTIONS, self.name, counts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(where: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise common.AnnotationError(f'{where}: {name} {text!r} is not a number')
    return value
