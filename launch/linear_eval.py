"""Linear probes of exported backbones on downstream sets: features, probe, table and chart.

  python launch/linear_eval.py --config=configs/demo.py --workdir=workdirs/demo
  python launch/linear_eval.py --config=configs/vise_resnet50.py --workdir=/data/vise \
      --config.eval.exports='vise={workdir}/export/vise,random=/data/exports/random' \
      --config.eval.train=csv:/data/emotion/train.csv --config.eval.test=csv:/data/emotion/test.csv

Exports default to every directory under {workdir}/export; results go to {workdir}/eval
(results.md, results.json, results.png). Features are cached in {workdir}/eval/features, so a
rerun only refits the probes.
"""

import cli

if __name__ == '__main__':
    cli.run_stages(['linear_eval'])
