"""The manual-download TFDS builders of data/: tiny fake releases, built and read back.

Each test writes a manual_dir in the release's own layout (a few generated images plus the
annotation files), builds it into a temporary data_dir (ArrayRecord, no TensorFlow) and reads
it through vise_jax.inputs.tfds_images, matching every image's bytes to its expected label.
"""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vise_jax import inputs as input_lib
from vise_jax.errors import InputError
from vise_jax.inputs.sources import MULTI_LABEL, SINGLE_LABEL

DATA = Path(__file__).resolve().parents[1] / 'data'
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))

import build_tfds  # noqa: E402  (data/ on sys.path, as `python data/build_tfds.py` has it)

build_tfds.register()

from vise_emotion6 import vise_emotion6_dataset_builder as emotion6  # noqa: E402
from vise_fi import vise_fi_dataset_builder as fi  # noqa: E402
from vise_intentonomy import vise_intentonomy_dataset_builder as intentonomy  # noqa: E402
from vise_politics import vise_politics_dataset_builder as politics  # noqa: E402
from vise_unbiasedemo import vise_unbiasedemo_dataset_builder as unbiasedemo  # noqa: E402


def image_bytes(seed: int, fmt: str = 'JPEG') -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


class Release:
    """Writes images under a root and remembers {bytes: (image id, label)}."""

    def __init__(self, root: Path):
        self.root = root
        self.expected: dict[bytes, tuple[str, object]] = {}

    def image(self, relative: str, label, fmt: str = 'JPEG', record: bool = True) -> str:
        data = image_bytes(len(self.expected) + 1000 * record, fmt)
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if record:
            self.expected[data] = (relative, label)
        return relative


def read_split(name, split, data_dir, label_key='label'):
    """{image id: label} of a built split, checked image by image against what was written."""
    data = input_lib.tfds_images(name, split, data_dir=str(data_dir), label_key=label_key)
    return data, data.images.read(range(len(data)))


def check_labels(data, images, expected, label_of):
    """Every stored image is one that was written, with the label it was written with."""
    classes = data.tasks[data_key(data)].classes
    labels = data.labels[data_key(data)]
    ids = []
    for i, encoded in enumerate(images):
        image_id, label = expected[encoded]
        assert label_of(classes, labels[i]) == label, image_id
        ids.append(image_id)
    return ids


def data_key(data):
    (key,) = data.tasks
    return key


def single(classes, value):
    return classes[int(value)]


def build(name, manual_dir, data_dir):
    return build_tfds.build(name, str(manual_dir), str(data_dir))


def test_fi_with_split_lists(tmp_path):
    release = Release(tmp_path / 'manual' / 'emotion_dataset')  # the archive's top folder
    ids = [release.image(f'{c}/{c}_{n:04d}.jpg', c) for c in fi.CLASSES for n in range(3)]
    (release.root / 'anger' / 'notes.txt').write_text('not an image')
    lists = {'train': ids[0::3], 'val': ids[1::3], 'test': ids[2::3][:-1]}  # one left out
    (release.root / 'splits').mkdir()
    for split, names in lists.items():
        (release.root / 'splits' / f'{split}.txt').write_text('# ids\n' + '\n'.join(names))
    builder = build('vise_fi', tmp_path / 'manual', tmp_path / 'tfds')
    assert builder.info.metadata['unlisted'] == 1
    for split, names in lists.items():
        data, images = read_split('vise_fi', split, tmp_path / 'tfds')
        assert data.tasks['label'].classes == fi.CLASSES
        assert data.tasks['label'].type == SINGLE_LABEL
        assert sorted(check_labels(data, images, release.expected, single)) == sorted(names)


def test_emotion6_ground_truth_and_hash_split(tmp_path):
    release = Release(tmp_path / 'manual' / 'Emotion6' / 'images')
    rows = ['[image_filename]\t[valence]\t[arousal]\t[prob. anger]\t[prob. disgust]\t'
            '[prob. fear]\t[prob. joy]\t[prob. sadness]\t[prob. surprise]\t[prob. neutral]']
    dominant = {}
    for c, emotion in enumerate(emotion6.CLASSES):
        for n in range(1, 5):
            image_id = release.image(f'{emotion}/{n}.jpg', emotion)
            shares = np.zeros(7)
            shares[(c + n) % 7], shares[(c + n + 1) % 7] = 0.7, 0.3
            dominant[image_id] = emotion6.DISTRIBUTION[(c + n) % 7]
            rows.append('\t'.join([image_id, '4.5', '5.1', *(f'{p:g}' for p in shares)]))
    (release.root.parent / 'ground_truth.txt').write_text('\n'.join(rows) + '\n')
    builder = build('vise_emotion6', tmp_path / 'manual', tmp_path / 'tfds')
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    assert sizes == {'train': 20, 'test': 4}  # stable: a hash of each image id
    seen = []
    for split in ('train', 'test'):
        data, images = read_split('vise_emotion6', split, tmp_path / 'tfds')
        assert data.tasks['label'].classes == emotion6.CLASSES
        seen += check_labels(data, images, release.expected, single)
        data, images = read_split('vise_emotion6', split, tmp_path / 'tfds', 'dominant_emotion')
        assert data.tasks['dominant_emotion'].classes == emotion6.DISTRIBUTION
        for i, encoded in enumerate(images):
            image_id = release.expected[encoded][0]
            assert single(emotion6.DISTRIBUTION, data.labels['dominant_emotion'][i]) == \
                dominant[image_id]
    assert sorted(seen) == sorted(dominant)


def test_unbiasedemo_objects_under_emotions(tmp_path):
    release = Release(tmp_path / 'manual' / 'UnBiasedEmo' / 'images')
    for c, emotion in enumerate(unbiasedemo.CLASSES):
        for n, thing in enumerate(['dog', 'baby', 'dog']):
            release.image(f'{emotion}/{thing}/{n}.{"png" if c % 2 else "jpg"}', emotion,
                          fmt='PNG' if c % 2 else 'JPEG')
    builder = build('vise_unbiasedemo', tmp_path / 'manual', tmp_path / 'tfds')
    assert builder.info.metadata['split_source'].startswith('hash of image_id')
    seen = []
    for split in ('train', 'test'):
        data, images = read_split('vise_unbiasedemo', split, tmp_path / 'tfds')
        assert data.tasks['label'].classes == unbiasedemo.CLASSES
        seen += check_labels(data, images, release.expected, single)
        assert len(data) > 0
    assert len(seen) == 18


def test_politics_csv_with_splits(tmp_path):
    release = Release(tmp_path / 'manual')
    lines = ['image,label,split,source']
    splits = {'train': [], 'val': [], 'test': []}
    for n in range(9):
        label = politics.CLASSES[n % 2]
        split = ['train', 'train', 'train', 'val', 'test'][n % 5]
        image_id = release.image(f'img/{n}.jpg', label)
        written_label = label if n % 4 < 2 else label[0].upper()  # 'L' / 'R' accepted too
        lines.append(f'{image_id},{written_label},{"validation" if split == "val" else split},'
                     f'outlet{n}')
        splits[split].append(image_id)
    (release.root / 'annotations.csv').write_text('\n'.join(lines) + '\n')
    build('vise_politics', tmp_path / 'manual', tmp_path / 'tfds')
    for split, names in splits.items():
        data, images = read_split('vise_politics', split, tmp_path / 'tfds')
        assert data.tasks['label'].classes == ('left', 'right')
        assert sorted(check_labels(data, images, release.expected, single)) == sorted(names)


def intentonomy_release(root: Path, missing: int = 0):
    """annotations/intentonomy_{split}2020.json + images/low/<id>.jpg; returns {split: ids}."""
    release = Release(root / 'images')
    categories = [{'id': i, 'name': name} for i, name in enumerate(intentonomy.CLASSES)]
    ids = {}
    for s, split in enumerate(intentonomy.SPLITS):
        images, annotations, ids[split] = [], [], []
        for n in range(4):
            image_id = f'{split}{n:02d}'
            labels = sorted({(s * 7 + n * 3) % 28, (n * 11 + 5) % 28})
            filename = f'low/{image_id}.jpg'
            if n < missing and split == 'train':
                pass  # the download script could not fetch it
            else:
                release.image(filename, labels)
                ids[split].append(image_id)
            images.append({'id': image_id, 'filename': filename, 'original_id': f'u{n}',
                           'unsplash_url': f'https://example.invalid/{n}'})
            annotation = {'id': n, 'image_id': image_id}
            if split == 'train':  # annotator shares: 1/3 or 2/3 per chosen intent
                softprob = [0.0] * 28
                for k, label in enumerate(labels):
                    softprob[label] = [1 / 3, 2 / 3][k % 2]
                annotation['category_ids_softprob'] = softprob
            else:
                annotation['category_ids'] = labels
            annotations.append(annotation)
        (root / 'annotations').mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / f'intentonomy_{split}2020.json').write_text(json.dumps({
            'info': {'year': 2020, 'version': '1.0', 'description': 'fake',
                     'date_created': '2020'},
            'categories': categories, 'images': images, 'annotations': annotations}))
    return release, ids


def test_intentonomy_multi_label_with_missing_images(tmp_path):
    release, ids = intentonomy_release(tmp_path / 'manual', missing=1)
    builder = build('vise_intentonomy', tmp_path / 'manual', tmp_path / 'tfds')
    assert builder.info.metadata['missing_images'] == {'train': 1, 'val': 0, 'test': 0}
    for split in intentonomy.SPLITS:
        data, images = read_split('vise_intentonomy', split, tmp_path / 'tfds')
        task = data.tasks['label']
        assert task.type == MULTI_LABEL and task.classes == intentonomy.CLASSES
        assert data.labels['label'].shape == (len(ids[split]), 28)
        seen = []
        for i, encoded in enumerate(images):
            image_id, labels = release.expected[encoded]
            np.testing.assert_array_equal(np.flatnonzero(data.labels['label'][i]), labels)
            seen.append(Path(image_id).stem)
        assert sorted(seen) == ids[split]
    import tensorflow_datasets as tfds

    source = tfds.data_source('vise_intentonomy', split='train', data_dir=str(tmp_path / 'tfds'))
    example = source[0]
    shares = example['label_softprob']
    assert shares.shape == (28,) and set(np.round(shares[shares > 0] * 3)) <= {1.0, 2.0}
    np.testing.assert_array_equal(np.flatnonzero(shares), np.sort(example['label']))


def test_a_built_dataset_feeds_the_probe_pipeline(tmp_path):
    from vise_jax import configlib

    intentonomy_release(tmp_path / 'manual')
    build('vise_intentonomy', tmp_path / 'manual', tmp_path / 'tfds')
    data = input_lib.tfds_images('vise_intentonomy', 'val', data_dir=str(tmp_path / 'tfds'))
    config = configlib.default_config()
    config.input.update(dict(image_size=8, global_batch_size=4, num_workers=0))
    batch = next(input_lib.downstream_data(data, 'label', config, process_index=0,
                                           process_count=1).iterator())
    assert batch['label'].shape == (4, 28) and batch['weight'].all()
    assert not batch['bad_image'].any()


def write_emotion6_rows(root: Path, rows: list[str]):
    release = Release(root / 'Emotion6' / 'images')
    for emotion in emotion6.CLASSES:
        release.image(f'{emotion}/1.jpg', emotion)
    (root / 'Emotion6' / 'ground_truth.txt').write_text('\n'.join(
        ['[image_filename]\t[valence]\t[arousal]\t...'] + rows) + '\n')


GOOD = '\t4\t5\t0.5\t0.5\t0\t0\t0\t0\t0'


def bad_emotion6_class(root):
    write_emotion6_rows(root, ['anger/1.jpg' + GOOD, 'happy/1.jpg' + GOOD])
    return 'vise_emotion6', r"ground_truth.txt:3: unknown class 'happy'"


def bad_emotion6_number(root):
    write_emotion6_rows(root, ['anger/1.jpg' + GOOD.replace('5', 'five', 1)])
    return 'vise_emotion6', r"ground_truth.txt:2: arousal 'five' is not a number"


def bad_emotion6_missing_image(root):
    write_emotion6_rows(root, ['anger/1.jpg' + GOOD, 'joy/9.jpg' + GOOD])
    return 'vise_emotion6', r"ground_truth.txt:3: image 'joy/9.jpg' not found"


def bad_fi_folder(root):
    release = Release(root)
    for c in (*fi.CLASSES, 'happiness'):
        release.image(f'{c}/{c}_0001.jpg', c)
    return 'vise_fi', r"unknown class folder\(s\) \['happiness'\]"


def bad_fi_split_list(root):
    release = Release(root)
    for c in fi.CLASSES:
        release.image(f'{c}/{c}_0001.jpg', c)
    (root / 'splits').mkdir()
    (root / 'splits' / 'train.txt').write_text('anger/anger_0001.jpg\n')
    (root / 'splits' / 'val.txt').write_text('awe/awe_0001.jpg\nanger/anger_0001.jpg\n')
    (root / 'splits' / 'test.txt').write_text('fear/fear_0001.jpg\n')
    return 'vise_fi', r"val.txt:2: 'anger/anger_0001.jpg' is already listed at .*train.txt:1"


def bad_politics_repeat(root):
    Release(root).image('a.jpg', 'left')
    (root / 'annotations.csv').write_text('image,label\na.jpg,left\na.jpg,centre\n')
    return 'vise_politics', r"annotations.csv:3: .*repeats line 2"


def bad_politics_class(root):
    release = Release(root)
    release.image('a.jpg', 'left')
    release.image('b.jpg', 'left')
    (root / 'annotations.csv').write_text('image,label\na.jpg,left\nb.jpg,centre\n')
    return 'vise_politics', r"annotations.csv:3: column 'label': unknown class 'centre'"


def bad_politics_image(root):
    Release(root).image('a.jpg', 'left')
    (root / 'annotations.csv').write_text('image,label,split\na.jpg,left,train\n'
                                          'gone.jpg,right,test\n')
    return 'vise_politics', r"annotations.csv:3: image 'gone.jpg' not found"


def bad_politics_empty_split(root):
    Release(root).image('a.jpg', 'left')
    (root / 'annotations.csv').write_text('image,label,split\na.jpg,left,train\n')
    return 'vise_politics', r"split 'val' has no examples"


def bad_intentonomy_image_id(root):
    intentonomy_release(root)
    path = root / 'annotations' / 'intentonomy_val2020.json'
    data = json.loads(path.read_text())
    data['annotations'][2]['image_id'] = 'nope'
    path.write_text(json.dumps(data))
    return 'vise_intentonomy', (r"intentonomy_val2020.json \(annotations\[2\]\): image_id "
                                r"'nope' is not among the file's images")


def bad_intentonomy_class_id(root):
    intentonomy_release(root)
    path = root / 'annotations' / 'intentonomy_test2020.json'
    data = json.loads(path.read_text())
    data['annotations'][1]['category_ids'] = [3, 28]
    path.write_text(json.dumps(data))
    return 'vise_intentonomy', (r"intentonomy_test2020.json \(annotations\[1\]\): "
                                r"'category_ids': unknown class id 28; ids are 0..27")


def bad_intentonomy_no_images(root):
    intentonomy_release(root)
    for path in (root / 'images' / 'low').glob('val*'):
        path.unlink()
    return 'vise_intentonomy', r"intentonomy_val2020.json: none of its 4 images were found"


def bad_intentonomy_categories(root):
    intentonomy_release(root)
    path = root / 'annotations' / 'intentonomy_train2020.json'
    data = json.loads(path.read_text())
    data['categories'][5]['name'] = 'Lazy'
    path.write_text(json.dumps(data))
    return 'vise_intentonomy', r"id 5 is 'Lazy', expected 'EasyLife'"


def bad_manual_dir(root):
    (root / 'unrelated.txt').write_text('x')
    return 'vise_emotion6', r"'ground_truth.txt' not found in manual_dir"


def empty_manual_dir(root):
    return 'vise_politics', (r'vise_politics: Manual directory .* does not exist or is empty'
                             r'(.|\n)*<manual_dir>/annotations.csv')  # + the instructions


@pytest.mark.parametrize('make', [
    bad_emotion6_class, bad_emotion6_number, bad_emotion6_missing_image, bad_fi_folder,
    bad_fi_split_list, bad_politics_repeat, bad_politics_class, bad_politics_image,
    bad_politics_empty_split, bad_intentonomy_image_id, bad_intentonomy_class_id,
    bad_intentonomy_no_images, bad_intentonomy_categories, bad_manual_dir, empty_manual_dir,
], ids=lambda make: make.__name__[4:])
def test_bad_annotations_name_the_file_and_row(tmp_path, make):
    (tmp_path / 'manual').mkdir()
    name, message = make(tmp_path / 'manual')
    with pytest.raises(InputError, match=message):
        build(name, tmp_path / 'manual', tmp_path / 'tfds')
    assert not list((tmp_path / 'tfds').glob(f'{name}/*/*.*'))  # nothing half-written


def test_build_script_prints_the_error_without_a_traceback(tmp_path, capsys):
    (tmp_path / 'manual').mkdir()
    bad_emotion6_class(tmp_path / 'manual')
    code = build_tfds.main(['vise_emotion6', f'--manual_dir={tmp_path / "manual"}',
                            f'--data_dir={tmp_path / "tfds"}'])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown class 'happy'" in err and 'Traceback' not in err
