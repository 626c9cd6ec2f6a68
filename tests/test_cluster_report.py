"""The cluster report names what it leaves out, and shows example images per cluster."""

import io

import numpy as np
import pytest
from PIL import Image

from vise_jax import artifacts, posts
from vise_jax.cluster import labels, report
from vise_jax.posts import store as store_lib

UNDECODABLE = b'not an image'


def comment_head(k, example_posts=None, texts=None):
    """A comment head whose cluster c has k - c members (cluster 0 the largest)."""
    sizes = np.arange(k, 0, -1)
    texts = texts or [[f'comment of cluster {c}'] for c in range(k)]
    return report.HeadSummary(f'comments_k{k}', labels.COMMENTS, k, sizes, nearest_texts=texts,
                              example_posts=example_posts)


def report_text(tmp_path, heads, image_bytes=None):
    summary = report.write_report(tmp_path, heads, ['like', 'sad'], image_bytes)
    return (tmp_path / report.REPORT_DIR / 'report.md').read_text(), summary


def test_report_names_the_clusters_it_leaves_out(tmp_path):
    k = report.CLUSTERS_LISTED + 14
    text, summary = report_text(tmp_path, [comment_head(k)])
    listed = report.CLUSTERS_LISTED
    shown, total = sum(range(k, k - listed, -1)), k * (k + 1) // 2
    assert (f'Listed: the {listed} largest of {k} clusters, holding {shown:,} of {total:,} '
            f'comments ({shown / total:.1%}). Every cluster is in the sizes plot and in '
            f'[heads/comments_k{k}.json](../heads/comments_k{k}.json).') in text
    rows = [line for line in text.splitlines() if line.startswith('| ') and '---' not in line]
    assert len(rows) == 1 + listed   # the header, then the listed clusters
    assert summary[f'comments_k{k}']['listed'] == listed


def test_report_has_no_truncation_note_when_every_cluster_is_listed(tmp_path):
    reactions = report.HeadSummary('reactions_k3', labels.REACTIONS, 3, np.array([2, 1, 1]),
                                   mean_profiles=np.full((3, 2), 0.5))
    text, _ = report_text(tmp_path, [comment_head(report.CLUSTERS_LISTED), reactions])
    assert 'Listed:' not in text and 'cut to' not in text
    assert '4 posts with reactions' in text


def test_report_names_comments_it_cuts(tmp_path):
    long = 'word ' * 30
    text, _ = report_text(tmp_path, [comment_head(2, texts=[[long, 'short'], [long]])])
    assert (f'2 of these comments are cut to {report.TEXT_CUT} characters (...); '
            '[heads/comments_k2.json](../heads/comments_k2.json) has them whole.') in text
    assert 'up to 2 comments nearest the centroid' in text


def test_example_posts_are_distinct_nearest_first():
    assert report.example_posts(np.array([5, 3, 5, 2, 3, 9, 1, 7, 8])) == [5, 3, 2, 9, 1, 7]
    assert report.example_posts(np.array([4, 4]), limit=6) == [4]
    assert report.example_posts(np.zeros(0, np.int64)) == []


def test_example_posts_survive_the_head_record():
    head = comment_head(2, example_posts=[[3, 1], []])
    assert report.HeadSummary.from_json(head.to_json()).example_posts == [[3, 1], []]
    old_record = {key: value for key, value in head.to_json().items() if key != 'example_posts'}
    assert report.HeadSummary.from_json(old_record).example_posts is None


# --- The contact sheet ---------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (90, 40, 10), (10, 90, 40)]


def png_bytes(colour, size=(16, 16)):
    buffer = io.BytesIO()
    Image.new('RGB', size, colour).save(buffer, format='PNG')
    return buffer.getvalue()


def solid_colour_store(directory, images):
    """A posts store whose post i has image bytes images[i]; it is read by random access."""
    info = posts.ImageInfo('PNG', 16, 16, 'RGB')
    store_posts = [posts.Post(f'p{i}', (f'comment {i}',), dict.fromkeys(posts.REACTION_TYPES, 0),
                              info, f'x:{i}', image=data) for i, data in enumerate(images)]
    store_lib.write_shard(directory, 0, store_posts, posts.REACTION_TYPES)
    store_lib.write_index(directory, {0: len(store_posts)}, posts.REACTION_TYPES, extra={})
    artifacts.StageDir(directory, 'ingest', {}).finish({}, {})
    return posts.PostsStore(directory)


def cell(sheet, row, column):
    left, top = report.cell_origin(row, column)
    return sheet.crop((left, top, left + report.THUMB, top + report.THUMB))


def test_contact_sheet_puts_each_example_image_in_its_cell(tmp_path):
    images = [png_bytes(c) for c in COLOURS]
    images[5] = png_bytes(COLOURS[5], size=(40, 20))   # wide: fitted, centred vertically
    images[6] = UNDECODABLE
    store = solid_colour_store(tmp_path / 'posts', images)
    read = []

    def image_bytes(index):
        read.append(index)
        return store.image_bytes(index)

    # Cluster 0 is the largest, so it is row 0; cluster 2 is empty; cluster 1 shows posts 5, 6.
    head = comment_head(3, example_posts=[[2, 0, 4, 1, 3, 7, 0], [5, 6], []])
    text, summary = report_text(tmp_path, [head], image_bytes)
    sheet = Image.open(tmp_path / report.REPORT_DIR / 'examples_comments_k3.png')
    columns = report.EXAMPLES_PER_CLUSTER
    assert sheet.size == (report.LABEL_WIDTH + columns * (report.THUMB + report.GAP),
                          report.TITLE_HEIGHT + 3 * (report.THUMB + report.GAP))
    # Only the drawn images are read: the first EXAMPLES_PER_CLUSTER of each listed cluster.
    assert read == [2, 0, 4, 1, 3, 7, 5, 6]
    for column, post in enumerate([2, 0, 4, 1, 3, 7]):
        assert cell(sheet, 0, column).tobytes() == report.thumbnail(images[post]).tobytes()
        assert cell(sheet, 0, column).getpixel((32, 32)) == COLOURS[post]
    wide = cell(sheet, 1, 0)
    assert wide.getpixel((32, 4)) == (255, 255, 255) and wide.getpixel((32, 32)) == COLOURS[5]
    assert wide.crop((0, 16, 64, 48)).tobytes() == report.thumbnail(images[5]).tobytes()
    assert report.thumbnail(UNDECODABLE) is None
    assert cell(sheet, 1, 1).tobytes() == report.placeholder().tobytes()
    assert cell(sheet, 2, 0).getextrema() == ((255, 255),) * 3   # an empty cluster's row

    assert summary['comments_k3']['examples'] == {'drawn': 8, 'undecodable': 1}
    assert '![examples](examples_comments_k3.png)' in text
    assert 'up to 6 per cluster, the posts of the comments nearest the centroid' in text
    assert '1 of the 8 images could not be decoded: grey squares.' in text


def test_contact_sheet_draws_only_the_listed_clusters(tmp_path, monkeypatch):
    monkeypatch.setattr(report, 'CLUSTERS_LISTED', 2)
    store = solid_colour_store(tmp_path / 'posts', [png_bytes(c) for c in COLOURS[:4]])
    head = comment_head(4, example_posts=[[0], [1], [2], [3]])
    text, summary = report_text(tmp_path, [head], store.image_bytes)
    sheet = Image.open(tmp_path / report.REPORT_DIR / 'examples_comments_k4.png')
    assert sheet.size == report.sheet_size(2, report.EXAMPLES_PER_CLUSTER)
    assert summary['comments_k4']['examples'] == {'drawn': 2, 'undecodable': 0}
    assert 'one row for each of the 2 largest clusters' in text
    assert 'could not be decoded' not in text


def test_no_contact_sheet_without_images_or_example_posts(tmp_path):
    report_text(tmp_path, [comment_head(2)], lambda index: pytest.fail('read an image'))
    report_text(tmp_path, [comment_head(2, example_posts=[[0], [1]])])
    assert not list((tmp_path / report.REPORT_DIR).glob('examples_*.png'))


# --- On the tiny demo world: the examples are posts of their cluster -----------------------------

def test_examples_on_the_tiny_world_are_posts_of_their_cluster(labelled_world, tmp_path,
                                                               monkeypatch):
    store = posts.PostsStore(labelled_world / 'posts')
    label_store = labels.LabelStore(labelled_world / 'labels')
    built = artifacts.read_json(labelled_world / 'labels' / report.REPORT_DIR / 'report.json')
    heads = []
    for name in label_store.head_names:
        assert (labelled_world / 'labels' / report.REPORT_DIR / f'examples_{name}.png').exists()
        assert built[name]['examples']['undecodable'] == 0
        head = report.HeadSummary.from_json(
            artifacts.read_json(labelled_world / 'labels' / 'heads' / f'{name}.json')['summary'])
        labelled = label_store.head(name)
        for cluster, examples in enumerate(head.example_posts):
            assert len(set(examples)) == len(examples) <= report.EXAMPLES_PER_CLUSTER
            assert len(examples) == min(report.EXAMPLES_PER_CLUSTER, head.sizes[cluster]) or (
                head.kind == labels.COMMENTS)   # a cluster's comments may share posts
            for post in examples:
                assert cluster in labelled.post_cluster_ids(post)
        heads.append(head)
    # Redrawn with fewer clusters listed: the sheet and the note follow.
    monkeypatch.setattr(report, 'CLUSTERS_LISTED', 2)
    text, summary = report_text(tmp_path, heads, store.image_bytes)
    assert text.count('Listed: the 2 largest of') == len(heads)
    for head in heads:
        sheet = Image.open(tmp_path / report.REPORT_DIR / f'examples_{head.name}.png')
        assert sheet.size == report.sheet_size(2, report.EXAMPLES_PER_CLUSTER)
        first = report.listed_clusters(head)[0]
        post = head.example_posts[first][0]
        assert cell(sheet, 0, 0).tobytes() == report.thumbnail(store.image_bytes(post)).tobytes()
