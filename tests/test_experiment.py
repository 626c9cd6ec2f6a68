"""The demo experiment's pieces: supervised labels from a CSV column, and the verdict."""

import numpy as np
import pytest

from vise_jax import configlib, experiment, stages
from vise_jax.cluster import labels
from vise_jax.errors import InputError

KINDS = {'mood': experiment.SUBJECTIVE, 'object': experiment.OBJECTIVE}
PAPER_PATTERN = {'vise': {'mood': 0.8, 'object': 0.3},
                 'supervised': {'mood': 0.6, 'object': 0.7},
                 'random': {'mood': 0.2, 'object': 0.1}}


def test_the_papers_pattern_is_six_comparisons_that_all_hold():
    found = experiment.claims(PAPER_PATTERN, KINDS)
    assert [(c.task, c.better, c.worse) for c in found] == [
        ('mood', 'vise', 'supervised'), ('mood', 'vise', 'random'),
        ('mood', 'supervised', 'random'), ('object', 'supervised', 'vise'),
        ('object', 'vise', 'random'), ('object', 'supervised', 'random')]
    assert experiment.verdict(found) == (
        "Verdict: the paper's pattern holds (6 of 6 comparisons).")


def test_a_failed_comparison_is_named_with_its_numbers():
    scores = {name: dict(by_task) for name, by_task in PAPER_PATTERN.items()}
    scores['supervised']['mood'] = 0.2     # a tie with random is not a win
    found = experiment.claims(scores, KINDS)
    failed = [c for c in found if not c.holds]
    assert [(c.better, c.worse, c.task) for c in failed] == [('supervised', 'random', 'mood')]
    assert experiment.verdict(found).endswith('5 of 6 comparisons hold; fails: '
                                              'supervised <= random on mood.')
    assert failed[0].line('top1') == 'FAILS: supervised <= random on mood (top1 0.200 vs 0.200)'


def test_missing_baselines_or_kinds_leave_only_what_can_be_compared():
    only_random = {k: PAPER_PATTERN[k] for k in ('vise', 'random')}
    found = experiment.claims(only_random, {'mood': experiment.SUBJECTIVE, 'tags': None})
    assert [(c.task, c.worse) for c in found] == [('mood', 'random')]
    assert experiment.verdict([]).startswith('Verdict: nothing to compare')


def test_report_has_the_verdict_first(tmp_path):
    found = experiment.claims(PAPER_PATTERN, KINDS)
    path = experiment.write_report(tmp_path / 'report.md', found=found,
                                   metric_of={'mood': 'top1', 'object': 'top1'},
                                   results_table='| a |', chart='eval/results.png',
                                   sections={'More': 'text'})
    lines = path.read_text().splitlines()
    assert lines[2].startswith('Verdict: ') and '![linear-probe results](eval/results.png)' in lines
    assert lines.count('## More') == 1


def test_class_labels_from_a_csv_column(tmp_path):
    csv = tmp_path / 'latents.csv'
    csv.write_text('id,object,mood\np2,cat,joy\np0,tree,fear\np1,,calm\n')
    summary = labels.write_class_labels(tmp_path / 'labels', csv, 'object', ['p0', 'p1', 'p2'])
    (tmp_path / 'labels' / 'stage.json').write_text('{}')
    store = labels.LabelStore(tmp_path / 'labels')
    store.check_aligned(['p0', 'p1', 'p2'])
    head = store.head('object_k2')
    assert summary['heads']['object_k2']['classes'] == ['cat', 'tree']
    np.testing.assert_array_equal(head.ids, [1, -1, 0])       # p1 has no class: masked
    assert summary['posts_with_class'] == 2 and head.kind == labels.CLASSES


def test_class_labels_refuse_missing_rows_columns_and_single_classes(tmp_path):
    csv = tmp_path / 'latents.csv'
    csv.write_text('id,object\np0,cat\np1,cat\n')
    with pytest.raises(InputError, match=r"latents.csv: no row for 1 of 3 posts \(first: 'p9'\)"):
        labels.write_class_labels(tmp_path / 'a', csv, 'object', ['p0', 'p1', 'p9'])
    with pytest.raises(InputError, match="needs columns id and 'mood'"):
        labels.write_class_labels(tmp_path / 'b', csv, 'mood', ['p0', 'p1'])
    with pytest.raises(InputError, match='1 distinct classes; a classification head needs'):
        labels.write_class_labels(tmp_path / 'c', csv, 'object', ['p0', 'p1'])
    with pytest.raises(InputError, match="supervised_labels='latents.csv': .*'CSV:COLUMN'"):
        labels.parse_class_spec('latents.csv')
    with pytest.raises(InputError, match=r'l.csv: no such file \(config.experiment.supervised_l'):
        labels.parse_class_spec(f'{tmp_path}/l.csv:object')
    (tmp_path / 'l.csv').write_text('id,object\n')
    assert labels.parse_class_spec(f'{tmp_path}/l.csv:object') == (tmp_path / 'l.csv', 'object')


def test_unknown_baselines_are_refused_before_any_work(tmp_path):
    config = configlib.default_config()
    config.experiment.baselines = ('random,imagenet',)   # as --config...=random,imagenet gives
    with pytest.raises(InputError, match=r"unknown \['imagenet'\]; known: \('supervised', "
                                         r"'random'\)"):
        stages.baselines_stage(config, tmp_path)
    assert not any(tmp_path.iterdir())
