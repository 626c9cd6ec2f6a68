"""The paper's comparison at any scale: VisE features against supervised and random ones.

VisE's claim (Jia et al., ICCV 2021): features learned from engagement beat object-supervised
features on subjective tasks, while supervision on objects wins on objective tasks, and both
beat random features. `verdict` checks each part of that pattern on linear-probe scores and says
plainly which parts hold; `write_report` puts the verdict, the table and the chart on one page.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from vise_jax import artifacts

VISE, SUPERVISED, RANDOM = 'vise', 'supervised', 'random'
SUBJECTIVE, OBJECTIVE = 'subjective', 'objective'


@dataclasses.dataclass(frozen=True)
class Claim:
    """One comparison of the pattern: `better` beats `worse` on `task`."""

    task: str
    better: str
    worse: str
    better_score: float
    worse_score: float

    @property
    def holds(self) -> bool:
        return self.better_score > self.worse_score

    def line(self, metric: str) -> str:
        sign = '>' if self.holds else '<='
        return (f'{"holds" if self.holds else "FAILS"}: {self.better} {sign} {self.worse} on '
                f'{self.task} ({metric} {self.better_score:.3f} vs {self.worse_score:.3f})')


def claims(scores: Mapping[str, Mapping[str, float]],
           task_kinds: Mapping[str, str]) -> list[Claim]:
    """The comparisons the paper's pattern implies for the exports and tasks present.

    scores[export][task] is the task's headline metric (higher is better).
    """
    present = set(scores)
    result = []

    def add(task: str, better: str, worse: str) -> None:
        if {better, worse} <= present and task in scores[better] and task in scores[worse]:
            result.append(Claim(task, better, worse, scores[better][task], scores[worse][task]))

    for task, kind in task_kinds.items():
        if kind == SUBJECTIVE:
            add(task, VISE, SUPERVISED)
        elif kind == OBJECTIVE:
            add(task, SUPERVISED, VISE)
        add(task, VISE, RANDOM)
        add(task, SUPERVISED, RANDOM)
    return result


def verdict(found: list[Claim]) -> str:
    """One line: does the paper's pattern hold here?"""
    if not found:
        return ('Verdict: nothing to compare (the comparison needs the vise export and at '
                'least one baseline on tasks marked subjective or objective).')
    failed = [claim for claim in found if not claim.holds]
    if not failed:
        return f"Verdict: the paper's pattern holds ({len(found)} of {len(found)} comparisons)."
    parts = '; '.join(f'{c.better} <= {c.worse} on {c.task}' for c in failed)
    return (f"Verdict: the paper's pattern does not fully hold: {len(found) - len(failed)} of "
            f'{len(found)} comparisons hold; fails: {parts}.')


def write_report(path: str | os.PathLike, *, found: list[Claim], metric_of: Mapping[str, str],
                 results_table: str, chart: str | None, sections: Mapping[str, str]) -> Path:
    """A Markdown page: verdict, each comparison, the results table and chart, then links."""
    path = Path(path)
    lines = ['# VisE experiment report', '', verdict(found), '']
    lines += [f'- {claim.line(metric_of.get(claim.task, "score"))}' for claim in found]
    lines += ['', '## Linear probes', '', results_table.strip(), '']
    if chart:
        lines += [f'![linear-probe results]({chart})', '']
    for title, body in sections.items():
        lines += [f'## {title}', '', body.strip(), '']
    artifacts.atomic_write_text(path, '\n'.join(lines))
    return path
