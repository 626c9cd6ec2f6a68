"""UnBiasedEmo, Panda et al., ECCV 2018: ~3k images, 6 emotions over shared objects/scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
import vise_tfds_common as common

CLASSES = ('anger', 'fear', 'joy', 'love', 'sadness', 'surprise')
# No split is published: 80% train / 20% test by a hash of the image id.
FRACTIONS = {'train': 0.8, 'test': 0.2}

_CITATION = """\
@inproceedings{panda2018contemplating,
  title={Contemplating Visual Emotions: Understanding and Overcoming Dataset Bias},
  author={Panda, Rameswar and Zhang, Jianming and Li, Haoxiang and Lee, Joon-Young and
          Lu, Xin and Roy-Chowdhury, Amit K},
  booktitle={ECCV},
  year={2018}
}"""


class Builder(common.ManualImageBuilder):
    """UnBiasedEmo: the same objects and scenes shown under different emotions."""

    SPLITS = tuple(FRACTIONS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Request UnBiasedEmo from its authors (Panda et al., ECCV 2018) and unpack it so that one
    folder per emotion holds a folder per object or scene category:

      <manual_dir>/anger/<object>/<image>.jpg
      <manual_dir>/fear/  joy/  love/  sadness/  surprise/

    (Up to two enclosing folders, e.g. <manual_dir>/UnBiasedEmo/images/anger/..., are found
    too.) The label is the emotion folder, 'object' the folder below it, and the image id
    '<emotion>/<object>/<file>'. No split is published: by default a hash of the image id gives
    80% train / 20% test; to fix your own, add splits/train.txt and splits/test.txt beside the
    emotion folders, one image id a line.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description='UnBiasedEmo (Panda et al., ECCV 2018): 6 emotions, each shown across '
                        'the same object and scene categories to reduce dataset bias. label: '
                        "the emotion folder; object: the category folder below it ('' if "
                        'none).',
            features=tfds.features.FeaturesDict({
                'image': common.image_feature(),
                'label': tfds.features.ClassLabel(names=CLASSES),
                'object': tfds.features.Text(),
                'image_id': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://rpand002.github.io/emotion.html',
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _read_manual_dir(self, manual_dir: Path,
                         counts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        root = common.find_root(manual_dir, CLASSES[0], self.name)
        records = []
        for label, folder in common.class_folders(root, CLASSES, self.name).items():
            for path in common.images_under(folder, self.name):
                inner = path.relative_to(folder).parts
                records.append({'image': path, 'label': label,
                                'object': inner[0] if len(inner) > 1 else '',
                                'image_id': path.relative_to(root).as_posix()})
        return common.assign_splits(records, root, FRACTIONS, self.name, counts)
