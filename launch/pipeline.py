"""Runs every stage of the pipeline in order, skipping those already done.

  python launch/pipeline.py --config=configs/demo.py --workdir=workdirs/demo

Stages: demo_world (when config.demo.enabled), ingest, embed, cluster, train, export, baselines
(config.experiment.baselines), linear_eval (config.eval.train/test). With baselines, the last
stage writes {workdir}/report.md: the verdict on the paper's pattern, the table and the chart.
"""

import cli

from vise_jax import stages

if __name__ == '__main__':
    cli.run_stages(list(stages.STAGES))
