"""FI (Flickr and Instagram) image emotion dataset, You et al., AAAI 2016: 8 emotions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
import vise_tfds_common as common

CLASSES = ('amusement', 'anger', 'awe', 'contentment', 'disgust', 'excitement', 'fear',
           'sadness')
# No split is published; the paper's own was a random 80% / 5% / 15% (train / val / test).
FRACTIONS = {'train': 0.80, 'val': 0.05, 'test': 0.15}

_CITATION = """\
@inproceedings{you2016building,
  title={Building a Large Scale Dataset for Image Emotion Recognition: The Fine Print and
         The Benchmark},
  author={You, Quanzeng and Luo, Jiebo and Jin, Hailin and Yang, Jianchao},
  booktitle={AAAI},
  year={2016}
}"""


class Builder(common.ManualImageBuilder):
    """FI: ~23k Flickr/Instagram images, one of 8 emotions each (AMT-verified)."""

    SPLITS = tuple(FRACTIONS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Request FI (the "Flickr and Instagram" emotion dataset of You et al., AAAI 2016) from its
    authors and unpack it so that one folder per emotion holds its images:

      <manual_dir>/amusement/amusement_0001.jpg
      <manual_dir>/anger/...   awe/  contentment/  disgust/  excitement/  fear/  sadness/

    (The archive's own top folder, e.g. <manual_dir>/emotion_dataset/amusement/..., is found
    too.) The image id is '<emotion>/<file>'. No split is published: by default a hash of the
    image id gives 80% train / 5% val / 15% test; to use a split of your own, add
    splits/train.txt, splits/val.txt and splits/test.txt beside the emotion folders, one image
    id a line.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description='FI image emotion dataset (You et al., AAAI 2016): 8 emotion '
                        'categories, the label being the emotion folder of each image.',
            features=tfds.features.FeaturesDict({
                'image': common.image_feature(),
                'label': tfds.features.ClassLabel(names=CLASSES),
                'image_id': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://qzyou.github.io/',
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _read_manual_dir(self, manual_dir: Path,
                         counts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        root = common.find_root(manual_dir, CLASSES[0], self.name)
        records = []
        for label, folder in common.class_folders(root, CLASSES, self.name).items():
            for path in common.images_under(folder, self.name):
                records.append({'image': path, 'label': label,
                                'image_id': path.relative_to(root).as_posix()})
        return common.assign_splits(records, root, FRACTIONS, self.name, counts)
