"""The sweep: one run per (variant, seed), shared upstream outputs, mean +- std and the verdict."""

import json

import ml_collections
import pytest
from conftest import load_config, run_launch

from vise_jax import artifacts, sweep
from vise_jax.errors import InputError


def sweep_config(**experiment):
    config = load_config('demo.py', 'size=tiny,sweep')
    config.experiment.update(experiment)
    return config


def test_a_variant_is_merged_onto_the_config_and_unknown_keys_are_named():
    config = load_config('demo.py', 'size=tiny')
    merged = sweep.merged(config, {'cluster': {'reaction_ks': ()}, 'embed': {'sp_dim': 32}}, 'v')
    assert merged.cluster.reaction_ks == () and merged.embed.sp_dim == 32
    assert config.cluster.reaction_ks == (3,)          # the config itself is untouched
    with pytest.raises(InputError, match='v: the config has no key cluster.reaction_k$'):
        sweep.merged(config, {'cluster': {'reaction_k': ()}}, 'v')
    with pytest.raises(InputError, match='v: cluster is a section'):
        sweep.merged(config, {'cluster': 3}, 'v')
    with pytest.raises(InputError, match='v: embed.sp_dim'):
        sweep.merged(config, {'embed': {'sp_dim': 'wide'}}, 'v')


def test_plan_runs_every_seed_and_variant_and_shares_what_is_computed_alike(tmp_path):
    config = sweep_config(variants={'comments_only': {'cluster': {'reaction_ks': ()}},
                                    'single_label': {'input': {'max_targets_per_post': 1}}})
    runs = sweep.plan(config, tmp_path)
    assert [(run.variant, run.seed) for run in runs] == [
        ('base', 0), ('comments_only', 0), ('single_label', 0),
        ('base', 1), ('comments_only', 1), ('single_label', 1)]
    assert [bool(run.config.experiment.baselines) for run in runs] == [True, False, False] * 2
    assert all(run.config.experiment.seeds == () and not run.config.experiment.variants
               for run in runs)
    shared = [sweep.shared_dirs(run, tmp_path) for run in runs]
    assert len({dirs['world'] for dirs in shared}) == 1       # one world for every seed
    assert len({dirs['embeddings'] for dirs in shared}) == 1
    # Labels depend on the seed and the cluster settings, not on the training targets.
    assert shared[0]['labels'] == shared[2]['labels'] != shared[1]['labels']
    assert shared[0]['labels'] != shared[3]['labels']

    varied = sweep.plan(sweep_config(vary_world=True), tmp_path)
    assert len({sweep.shared_dirs(run, tmp_path)['world'] for run in varied}) == 2


def test_bad_sweeps_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(InputError, match='repeats a seed'):
        sweep.plan(sweep_config(seeds=(1, 1)), tmp_path)
    with pytest.raises(InputError, match="'base' names the config itself"):
        sweep.plan(sweep_config(variants={'base': {}}), tmp_path)
    with pytest.raises(InputError, match='not a usable directory name'):
        sweep.plan(sweep_config(variants={'a/b': {}}), tmp_path)


def collected(vise, supervised, random, comments_only=None):
    """Scores as collect_scores gives them: mood is subjective, object objective."""
    rows = {'vise': vise, 'supervised': supervised, 'random': random}
    if comments_only:
        rows['vise:comments_only'] = comments_only
    return {'tasks': {'mood': ('top1', 'subjective'), 'object': ('top1', 'objective')},
            'scores': {row: {task: dict(enumerate(values)) for task, values in by_task.items()}
                       for row, by_task in rows.items()}}


def test_a_comparison_holds_only_beyond_the_spread():
    summary = sweep.summarize(collected(
        vise={'mood': [0.80, 0.79, 0.78], 'object': [0.20, 0.30, 0.10]},
        supervised={'mood': [0.50, 0.785, 0.70], 'object': [0.60, 0.50, 0.55]},
        random={'mood': [0.66, 0.67, 0.68], 'object': [0.13, 0.14, 0.12]}))
    by_pair = {(c.task, c.better, c.worse): c for c in summary['claims']}
    assert by_pair['mood', 'vise', 'random'].holds            # 0.79 +- 0.01 vs 0.67 +- 0.01
    # VisE beats supervised on mood in every seed, but supervised varies more than the gap.
    mood = by_pair['mood', 'vise', 'supervised']
    assert not mood.holds and mood.seeds_holding == 3
    assert 'within the spread' in mood.line('top1')
    # Supervised is worse than random on mood on average: a failure, not a tie.
    assert 'FAILS' in by_pair['mood', 'supervised', 'random'].line('top1')
    # 0.20 +- 0.10 vs 0.13 +- 0.01: better on average, not beyond the spread.
    assert not by_pair['object', 'vise', 'random'].holds
    mean, std = summary['stats']['vise']['object']
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)

    text = sweep.report_text(summary)
    assert 'Verdict (vise, the config itself): 3 of 6 comparisons' in text
    assert '| vise | 79.0 +- 1.0 (n=3) | 20.0 +- 10.0 (n=3) |' in text


def test_every_variant_gets_its_own_comparisons():
    summary = sweep.summarize(collected(
        vise={'mood': [0.8, 0.8]}, supervised={'mood': [0.5, 0.5]}, random={'mood': [0.6, 0.6]},
        comments_only={'mood': [0.55, 0.57]}))
    rows = {(c.row, c.better, c.worse): c.holds for c in summary['claims']}
    assert rows[('vise:comments_only', 'vise:comments_only', 'supervised')]
    assert not rows[('vise:comments_only', 'vise:comments_only', 'random')]


def test_sweep_runs_reports_and_skips_finished_runs(tmp_path):
    config = sweep_config(baselines=('random',))   # the supervised baseline: test_pipeline
    summary = sweep.run_sweep(config, tmp_path)

    assert sorted(p.name for p in (tmp_path / 'shared').iterdir() if p.name.startswith('world')) \
        == [sweep.shared_dirs(sweep.plan(config, tmp_path)[0], tmp_path)['world'].name]
    base, variant = tmp_path / 'runs' / 'base' / 'seed_1', tmp_path / 'runs' / 'comments_only'
    assert (base / 'world').is_symlink() and (base / 'labels').is_symlink()
    assert (base / 'report.md').is_file() and (base / 'export' / 'random').is_dir()
    assert sorted(p.name for p in (variant / 'seed_0' / 'export').iterdir()) == ['vise']

    # The table is every run's own probe results, gathered.
    results = json.loads((base / 'eval' / 'results.json').read_text())
    saved = json.loads((tmp_path / sweep.RESULTS).read_text())
    assert saved['scores']['random']['mood']['1'] == \
        results['results']['random']['mood']['metrics']['top1']
    assert set(saved['scores']) == {'vise', 'vise:comments_only', 'random'}
    assert summary['stats']['vise']['mood'][1] >= 0
    text = (tmp_path / sweep.REPORT).read_text()
    assert '| vise:comments_only |' in text and '(n=2)' in text
    assert (tmp_path / sweep.CHART).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # A rerun changes nothing: every stage of every run is up to date.
    record = base / 'train' / artifacts.STAGE_RECORD
    before = record.stat().st_mtime_ns
    again = sweep.run_sweep(config, tmp_path)
    assert record.stat().st_mtime_ns == before
    assert again['stats'] == summary['stats']


def test_a_real_directory_where_a_link_goes_is_refused(tmp_path):
    config = sweep_config(seeds=(0,), variants=ml_collections.ConfigDict())
    (tmp_path / 'runs' / 'base' / 'seed_0' / 'posts').mkdir(parents=True)
    with pytest.raises(InputError, match='posts exists and is not a link'):
        sweep.run_sweep(config, tmp_path)


def test_launch_script_has_help():
    result = run_launch('sweep.py', '--help')
    assert result.returncode == 0
    assert 'once per seed and variant' in result.stdout
