"""Runs the experiment once per seed and variant, and reports mean +- std with the verdict.

  python launch/sweep.py --config=configs/demo.py:sweep --workdir=workdirs/sweep

The seeds are config.experiment.seeds, the variants config.experiment.variants (partial configs
merged onto the config). Each run is a pipeline workdir in {workdir}/runs/<variant>/seed_<seed>;
the world, posts, embeddings and labels runs would compute alike are computed once, in
{workdir}/shared. {workdir}/sweep.md has the table (mean +- std over seeds), the comparisons that
hold beyond the spread, and the chart; rerunning skips finished runs. See vise_jax/sweep.py.
"""

import cli

from vise_jax import stages

if __name__ == '__main__':
    cli.run_stages(list(stages.STAGES), sweep=True)
