"""Downstream sets (CSV manifest, image folder, TFDS) through the input pipeline."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from vise_jax import configlib
from vise_jax import inputs as input_lib
from vise_jax.errors import InputError

MOODS = ['calm', 'happy', 'sad']
OBJECTS = ['cat', 'dog']


def flat_jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (40, 30), (value, 255 - value, 90)).save(buffer, format='JPEG', quality=95)
    return buffer.getvalue()


def red_of(row: int) -> int:
    return 20 + 9 * row


def write_downstream(root, num_rows=10):
    """The demo world's layout: downstream/train.csv (image,object,mood) and tasks.json."""
    (root / 'images').mkdir(parents=True)
    lines = ['image,object,mood']
    for row in range(num_rows):
        (root / 'images' / f'{row}.jpg').write_bytes(flat_jpeg(red_of(row)))
        lines.append(f'images/{row}.jpg,{OBJECTS[row % 2]},{MOODS[row % 3]}')
    (root / 'train.csv').write_text('\n'.join(lines) + '\n')
    (root / 'tasks.json').write_text(json.dumps({
        'mood': {'type': 'single_label', 'column': 'mood', 'classes': MOODS,
                 'kind': 'subjective'},
        'object': {'type': 'single_label', 'column': 'object', 'classes': OBJECTS,
                   'kind': 'objective'}}))
    return root / 'train.csv'


def small_config():
    config = configlib.default_config()
    config.input.update(dict(image_size=16, global_batch_size=4, num_workers=0))
    return config


def check_rows(batch, labels_by_row):
    for row, index in enumerate(batch['index'].tolist()):
        if index < 0:
            assert batch['weight'][row] == 0 and batch['label'][row] == 0
            continue
        assert batch['weight'][row] == 1
        assert abs(batch['image'][row, ..., 0].mean() - red_of(index)) < 3
        assert batch['label'][row] == labels_by_row[index]


def test_csv_manifest_eval_pass_is_padded_and_aligned(tmp_path):
    data = input_lib.csv_manifest(write_downstream(tmp_path))
    assert set(data.tasks) == {'mood', 'object'} and data.tasks['mood'].classes == tuple(MOODS)
    np.testing.assert_array_equal(data.labels['mood'], [r % 3 for r in range(10)])
    batches = list(input_lib.downstream_data(data, 'mood', small_config(), process_index=0,
                                             process_count=1).iterator())
    assert len(batches) == 3 and set(batches[0]) == {'image', 'weight', 'index', 'bad_image',
                                                     'label'}
    assert [i for b in batches for i in b['index'].tolist()] == list(range(10)) + [-1, -1]
    for batch in batches:
        check_rows(batch, [r % 3 for r in range(10)])


def test_csv_manifest_training_stream_is_shuffled_and_aligned(tmp_path):
    data = input_lib.csv_manifest(write_downstream(tmp_path))
    downstream = input_lib.downstream_data(data, 'object', small_config(), training=True,
                                           process_index=0, process_count=1)
    assert downstream.steps_per_epoch == 2 and downstream.task.classes == tuple(OBJECTS)
    iterator = downstream.iterator()
    batches = [next(iterator) for _ in range(5)]  # past the end of an epoch
    indices = [i for b in batches for i in b['index'].tolist()]
    assert indices[:8] != sorted(indices[:8]) and len(set(indices[:8])) == 8
    for batch in batches:
        np.testing.assert_array_equal(batch['label'], batch['index'] % 2)
        assert batch['weight'].all()


def test_csv_manifest_errors_name_the_file_row_and_column(tmp_path):
    csv_path = write_downstream(tmp_path)
    csv_path.write_text(csv_path.read_text().replace('images/3.jpg,dog,calm',
                                                     'images/3.jpg,dog,angry'))
    with pytest.raises(InputError, match=r"train.csv:5: column 'mood': unknown class 'angry'"):
        input_lib.csv_manifest(csv_path)
    (tmp_path / 'bad.csv').write_text('picture,mood\nx.jpg,calm\n')
    with pytest.raises(InputError, match=r"bad.csv: no column 'image'"):
        input_lib.csv_manifest(tmp_path / 'bad.csv')
    with pytest.raises(InputError, match='tasks.json not found'):
        input_lib.csv_manifest(csv_path, tmp_path / 'elsewhere' / 'tasks.json')
    data = input_lib.csv_manifest(write_downstream(tmp_path / 'ok'))
    with pytest.raises(InputError, match="no task 'colour'"):
        input_lib.downstream_data(data, 'colour', small_config())


def test_multi_label_task_gives_multi_hot_labels(tmp_path):
    (tmp_path / 'a.jpg').write_bytes(flat_jpeg(10))
    (tmp_path / 'tags.csv').write_text('image,tags\na.jpg,cat|sad\na.jpg,\nmissing.jpg,dog\n')
    (tmp_path / 'tasks.json').write_text(json.dumps(
        {'tags': {'type': 'multi_label', 'classes': ['cat', 'dog', 'sad']}}))
    data = input_lib.csv_manifest(tmp_path / 'tags.csv')
    np.testing.assert_array_equal(data.labels['tags'], [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    config = small_config()
    batch = next(input_lib.downstream_data(data, 'tags', config, process_index=0,
                                           process_count=1).iterator())
    assert batch['label'].shape == (4, 3) and batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['label'][3], [0, 0, 0])  # padding
    assert input_lib.BAD_IMAGE_REASONS[batch['bad_image'][2]] == 'missing_file'
    np.testing.assert_array_equal(batch['weight'], [1, 1, 0, 0])


def test_image_folder_classes_are_sorted_folder_names(tmp_path):
    for row, name in enumerate(['dog', 'cat', 'dog']):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f'{row}.jpg').write_bytes(flat_jpeg(red_of(row)))
    (tmp_path / 'cat' / 'notes.txt').write_text('not an image')
    data = input_lib.image_folder(tmp_path)
    assert data.tasks['label'].classes == ('cat', 'dog')
    np.testing.assert_array_equal(data.labels['label'], [0, 1, 1])
    batch = next(input_lib.downstream_data(data, 'label', small_config(), process_index=0,
                                           process_count=1).iterator())
    assert abs(batch['image'][0, ..., 0].mean() - red_of(1)) < 3  # cat/1.jpg comes first
    with pytest.raises(InputError, match='no images in class folders'):
        input_lib.image_folder(tmp_path / 'cat')


def test_tfds_source_reads_a_registered_dataset(tmp_path):
    import tensorflow_datasets as tfds

    class TinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=['round', 'square'])}))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples()}

        def _generate_examples(self):
            for row in range(6):
                yield row, {'image': io.BytesIO(flat_jpeg(red_of(row))), 'label': row % 2}

    TinyShapes(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
    data = input_lib.tfds_images('tiny_shapes', 'train', data_dir=str(tmp_path))
    assert data.tasks['label'].classes == ('round', 'square') and len(data) == 6
    batches = list(input_lib.downstream_data(data, 'label', small_config(), process_index=0,
                                             process_count=1).iterator())
    assert len(batches) == 2
    for batch in batches:  # TFDS stores examples in its own order; colour says which row
        for row in np.flatnonzero(batch['weight']):
            red = batch['image'][row, ..., 0].mean()
            source_row = int(round((red - 20) / 9))
            assert abs(red - red_of(source_row)) < 3
            assert batch['label'][row] == source_row % 2
    with pytest.raises(InputError, match="cannot open TFDS dataset 'no_such_set'"):
        input_lib.tfds_images('no_such_set', 'train', data_dir=str(tmp_path))
