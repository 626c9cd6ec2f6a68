"""The paper's baselines, with the VisE run's backbone, schedule and budget.

  python launch/baselines.py --config=configs/demo.py --workdir=workdirs/demo
  python launch/baselines.py --config=configs/vise_resnet50.py --workdir=/data/vise \
      --config.experiment.baselines=supervised,random \
      --config.experiment.supervised_labels=/data/posts/classes.csv:label

'supervised' trains on one known class per post (a CSV with an 'id' column) into
{workdir}/baselines/supervised and exports it; 'random' exports freshly initialised weights.
Both land in {workdir}/export beside VisE's, where launch/linear_eval.py finds them.
"""

import cli

if __name__ == '__main__':
    cli.run_stages(['baselines'])
