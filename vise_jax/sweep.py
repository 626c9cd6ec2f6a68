"""Seeds and ablations: the whole experiment per (variant, seed), then one table with the spread.

A sweep is the config's experiment run once per seed in `config.experiment.seeds` (or
`config.seed` alone), for the config itself ('base', row 'vise') and for every variant in
`config.experiment.variants` (a partial config each, merged onto the config; row
'vise:<variant>'). Each run is an ordinary pipeline workdir, `{root}/runs/<variant>/seed_<seed>`,
so its report, curves and probes are where a single run puts them. The base run also trains and
probes the paper's baselines (config.experiment.baselines); the variants train and probe VisE
only, so a baseline is trained once per seed, not once per variant.

Runs share what they would compute identically: the demo world (one for every seed unless
config.experiment.vary_world), the posts store, the embeddings and the labels live in
`{root}/shared/<stage>-<key>`, linked into each run's workdir, where the key hashes every config
value that stage and the ones before it read. Finished runs are skipped by the stages
themselves; a rerun with more seeds or variants only runs what is new.

`{root}/sweep.md` gives mean +- std over seeds per (row, task) and the paper's comparisons for
every variant, each counted as holding only beyond the spread: the better row's mean - std must
exceed the worse row's mean + std. `sweep.json` has every run's scores, `sweep.png` the chart.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vise_jax import artifacts, experiment, stages
from vise_jax.configlib import map_strings, with_workdir
from vise_jax.errors import InputError

log = logging.getLogger(__name__)

BASE = 'base'
REPORT, RESULTS, CHART = 'sweep.md', 'sweep.json', 'sweep.png'

# The stage outputs runs share, in pipeline order, and the config each one reads (with the
# outputs before it): equal keys mean equal outputs, so one copy serves every run.
SHARED: dict[str, tuple[str, ...]] = {
    'world': ('demo',),
    'posts': ('posts', 'ingest', 'input.max_image_pixels'),
    'embeddings': ('embed',),
    'labels': ('cluster', 'seed'),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One pipeline run of the sweep."""

    variant: str
    seed: int
    config: ml_collections.ConfigDict     # '{workdir}' not yet expanded
    workdir: Path


def variants(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The configs to run by name: the config itself as 'base', then each variant's."""
    named = dict(config.experiment.variants)
    if BASE in named:
        raise InputError(f"config.experiment.variants: '{BASE}' names the config itself; "
                         'call the variant something else')
    return {BASE: config, **{name: merged(config, overrides, f'config.experiment.variants.{name}')
                             for name, overrides in named.items()}}


def row_name(variant: str) -> str:
    """The table's row for a variant's VisE features: 'vise' for the config itself."""
    return experiment.VISE if variant == BASE else f'{experiment.VISE}:{variant}'


def merged(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
           where: str) -> ml_collections.ConfigDict:
    """A copy of `config` with a partial config's values set; an unknown key names itself."""
    result = copy.deepcopy(config)

    def apply(node: ml_collections.ConfigDict, values: Mapping[str, Any], path: str) -> None:
        for key, value in values.items():
            if key not in node:
                raise InputError(f'{where}: the config has no key {path}{key}')
            if isinstance(node[key], ml_collections.ConfigDict):
                if not isinstance(value, Mapping | ml_collections.ConfigDict):
                    raise InputError(f'{where}: {path}{key} is a section; give it a mapping')
                apply(node[key], value, f'{path}{key}.')
            else:
                try:
                    node[key] = value
                except TypeError as e:
                    raise InputError(f'{where}: {path}{key}: {e}') from None

    with result.unlocked():
        apply(result, overrides, '')
    return result


def seeds(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    chosen = tuple(int(s) for s in config.experiment.seeds) or (int(config.seed),)
    if len(set(chosen)) != len(chosen):
        raise InputError(f'config.experiment.seeds repeats a seed: {chosen}')
    return chosen


def plan(config: ml_collections.ConfigDict, root: Path) -> list[Run]:
    """Every run of the sweep, seed-major (all variants of seed 0 first: a partial sweep
    already has every row)."""
    by_name = variants(config)
    for name in by_name:
        if not name.replace('_', '').replace('-', '').isalnum():
            raise InputError(f'config.experiment.variants: {name!r} is not a usable directory '
                             'name (letters, digits, _ and - only)')
    runs = []
    for seed in seeds(config):
        for name, variant in by_name.items():
            run_config = copy.deepcopy(variant)
            with run_config.unlocked():
                run_config.seed = seed
                run_config.experiment.seeds = ()          # a run is not a sweep
                run_config.experiment.variants = ml_collections.ConfigDict()
                if not config.experiment.vary_world:
                    run_config.demo.world_seed = config.seed if config.demo.world_seed < 0 \
                        else config.demo.world_seed
                if name != BASE:    # baselines depend on neither the labels nor the variant
                    run_config.experiment.baselines = ()
            runs.append(Run(name, seed, run_config, root / 'runs' / name / f'seed_{seed}'))
    return runs


def _value(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split('.'):
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def shared_dirs(run: Run, root: Path) -> dict[str, Path]:
    """Where this run's shared stage outputs live: {root}/shared/<name>-<key>."""
    config, found, upstream = run.config, {}, []
    for name, reads in SHARED.items():
        if name == 'world':
            if not config.demo.enabled:
                continue
            reads = (*reads, 'seed') if config.demo.world_seed < 0 else reads
        upstream.append({key: _value(config, key) for key in reads})
        key = artifacts.fingerprint(upstream)[:12]
        found[name] = root / 'shared' / f'{name}-{key}'
    return found


def link_shared(workdir: Path, targets: Mapping[str, Path]) -> None:
    """Links each shared output into the run's workdir; refuses to replace real data."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        target.mkdir(parents=True, exist_ok=True)
        link = workdir / name
        if link.is_symlink():
            if link.resolve() == target.resolve():
                continue
            link.unlink()      # the variant's config changed: point at the matching output
        elif link.exists():
            raise InputError(f'{link} exists and is not a link into {target.parent}; move it '
                             'away or choose another sweep workdir')
        link.symlink_to(target.resolve(), target_is_directory=True)


def pointed_at_shared(config: ml_collections.ConfigDict, workdir: Path,
                      targets: Mapping[str, Path]) -> ml_collections.ConfigDict:
    """The run's config with '{workdir}' expanded and paths into a shared output written as the
    shared directory's: the stages fingerprint paths, and every run must agree on them."""
    prefixes = {str(workdir / name): str(target.resolve()) for name, target in targets.items()}

    def repoint(value: str) -> str:
        for prefix, target in prefixes.items():
            if value == prefix or value.startswith(prefix + os.sep) or \
                    f':{prefix}{os.sep}' in value:
                value = value.replace(prefix, target)
        return value

    return map_strings(with_workdir(config, workdir), repoint)


# --- the runs --------------------------------------------------------------------------------


def run_sweep(config: ml_collections.ConfigDict, root: str | os.PathLike, *,
              command: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Runs every (variant, seed) through all the stages and writes the report.

    The sweep's root is locked while it runs (one sweep per root); each run's workdir is locked
    by its stages. `command` is stages.run's, for the message when inputs are missing.
    """
    root = Path(root)
    runs = plan(config, root)
    lock = stages.lock_workdir(root)
    try:
        for number, run in enumerate(runs, 1):
            log.info('sweep: run %d of %d: %s, seed %d -> %s', number, len(runs), run.variant,
                     run.seed, run.workdir)
            targets = shared_dirs(run, root)
            stages.on_process_zero(functools.partial(link_shared, run.workdir, targets),
                                   'sweep links')
            stages.run(pointed_at_shared(run.config, run.workdir, targets), run.workdir,
                       command=command)
        summary = summarize(collect_scores(runs))
        stages.on_process_zero(functools.partial(write_report, root, summary), 'sweep report')
        log.info('sweep: the report is %s', root / REPORT)
        return summary
    finally:
        if lock is not None:
            lock.release()


def collect_scores(runs: Sequence[Run]) -> dict[str, Any]:
    """Every run's headline probe scores: {'tasks': {task: (metric, kind)}, 'scores':
    {row: {task: {seed: score}}}}, rows being 'vise:<variant>' and the baselines' names."""
    tasks: dict[str, tuple[str, str | None]] = {}
    scores: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        results_path = run.workdir / 'eval' / 'results.json'
        try:
            results = artifacts.read_json(results_path)
        except FileNotFoundError:
            raise InputError(f'{results_path}: the run finished without probe results') from None
        for task, info in results['tasks'].items():
            tasks.setdefault(task, (info['metrics'][0], info.get('kind')))
        for name, by_task in results['results'].items():
            row = row_name(run.variant) if name == experiment.VISE else name
            for task, result in by_task.items():
                metric = tasks[task][0]
                scores.setdefault(row, {}).setdefault(task, {})[run.seed] = \
                    float(result['metrics'][metric])
    return {'tasks': tasks, 'scores': scores}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value: no spread to speak of)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class SpreadClaim:
    """A comparison of the paper's pattern over seeds: `better` beats `worse` on `task`."""

    row: str          # the VisE row the comparison is about
    task: str
    better: str
    worse: str
    better_stats: tuple[float, float]
    worse_stats: tuple[float, float]
    seeds_holding: int
    num_seeds: int

    @property
    def holds(self) -> bool:
        """Beyond the spread: the intervals mean +- std do not overlap, in the claimed order."""
        return self.better_stats[0] - self.better_stats[1] > sum(self.worse_stats)

    def line(self, metric: str) -> str:
        verdict = ('holds' if self.holds else
                   'within the spread' if self.better_stats[0] > self.worse_stats[0] else 'FAILS')
        (bm, bs), (wm, ws) = self.better_stats, self.worse_stats
        return (f'{verdict}: {self.better} > {self.worse} on {self.task} ({metric} '
                f'{bm:.3f} +- {bs:.3f} vs {wm:.3f} +- {ws:.3f}; better in '
                f'{self.seeds_holding} of {self.num_seeds} seeds)')


def summarize(collected: Mapping[str, Any]) -> dict[str, Any]:
    """Mean +- std per (row, task) and, per variant, the pattern's comparisons."""
    tasks, scores = collected['tasks'], collected['scores']
    stats = {row: {task: mean_std(list(by_seed.values())) for task, by_seed in by_task.items()}
             for row, by_task in scores.items()}
    kinds = {task: kind for task, (_, kind) in tasks.items()}
    vise_rows = [row for row in scores if row.split(':')[0] == experiment.VISE]
    baselines = [row for row in scores if row not in vise_rows]
    claims = []
    for row in vise_rows:
        names = {experiment.VISE: row, **{name: name for name in baselines}}
        means = {short: {task: stats[full][task][0] for task in stats[full]}
                 for short, full in names.items()}
        for claim in experiment.claims(means, kinds):
            better, worse = scores[names[claim.better]][claim.task], \
                scores[names[claim.worse]][claim.task]
            common = sorted(set(better) & set(worse))
            claims.append(SpreadClaim(
                row, claim.task, names[claim.better], names[claim.worse],
                stats[names[claim.better]][claim.task], stats[names[claim.worse]][claim.task],
                sum(better[s] > worse[s] for s in common), len(common)))
    return {'tasks': tasks, 'scores': scores, 'stats': stats, 'claims': claims}


# --- the report ------------------------------------------------------------------------------


def write_report(root: Path, summary: Mapping[str, Any]) -> None:
    """sweep.md (table and verdicts), sweep.json (every score), sweep.png (the chart)."""
    tasks, stats, scores = summary['tasks'], summary['stats'], summary['scores']
    artifacts.atomic_write_json(root / RESULTS, {
        'tasks': {task: {'metric': metric, 'kind': kind}
                  for task, (metric, kind) in tasks.items()},
        'scores': {row: {task: {str(seed): value for seed, value in by_seed.items()}
                         for task, by_seed in by_task.items()}
                   for row, by_task in scores.items()},
        'mean_std': stats,
        'claims': [{**dataclasses.asdict(claim), 'holds': claim.holds}
                   for claim in summary['claims']]})
    _plot(root / CHART, tasks, stats)
    artifacts.atomic_write_text(root / REPORT, report_text(summary))


def report_text(summary: Mapping[str, Any]) -> str:
    tasks, stats, scores = summary['tasks'], summary['stats'], summary['scores']
    claims: list[SpreadClaim] = summary['claims']
    num_seeds = max(len(by_seed) for by_task in scores.values() for by_seed in by_task.values())
    primary = [c for c in claims if c.row == experiment.VISE]
    held = sum(c.holds for c in primary)
    lines = ['# VisE sweep: seeds and ablations', '',
             f'Verdict (vise, the config itself): {held} of {len(primary)} comparisons of the '
             f"paper's pattern hold beyond the spread over {num_seeds} seed(s) (mean - std of the "
             'better row above mean + std of the worse).', '']
    header = ' | '.join(f'{task} ({metric}, {kind or "untyped"})'
                        for task, (metric, kind) in tasks.items())
    lines += ['## Scores (mean +- std over seeds; n = seeds)', '',
              f'| row | {header} |', '|---' * (len(tasks) + 1) + '|']
    for row, by_task in stats.items():
        cells = []
        for task in tasks:
            if task not in by_task:
                cells.append('')
                continue
            mean, std = by_task[task]
            cells.append(f'{100 * mean:.1f} +- {100 * std:.1f} (n={len(scores[row][task])})')
        lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'![scores]({CHART})', '', '## Comparisons per VisE row', '']
    for row in dict.fromkeys(c.row for c in claims):
        lines += [f'### {row}', '']
        lines += [f'- {c.line(tasks[c.task][0])}' for c in claims if c.row == row]
        lines.append('')
    lines += ['Every run is a pipeline workdir: runs/<variant>/seed_<seed>/ (report.md in '
              'runs/base/, eval/results.md, train/curves.png, labels/report/).', '']
    return '\n'.join(lines)


def _plot(path: Path, tasks: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = list(stats)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 + 0.5 * len(rows) * len(tasks), 4),
                             squeeze=False)
    for axis, (task, (metric, kind)) in zip(axes[0], tasks.items(), strict=True):
        present = [row for row in rows if task in stats[row]]
        means = [100 * stats[row][task][0] for row in present]
        stds = [100 * stats[row][task][1] for row in present]
        axis.bar(range(len(present)), means, yerr=stds, capsize=3,
                 color=['tab:orange' if row.startswith('vise') else 'tab:gray'
                        for row in present])
        axis.set_xticks(range(len(present)), present, rotation=60, ha='right', fontsize=8)
        axis.set_title(f'{task} ({kind or "untyped"})')
        axis.set_ylabel(f'{metric} (%), mean +- std')
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)
    plt.close(fig)
