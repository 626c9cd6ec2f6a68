"""Trains the multi-head ResNet on {workdir}/posts images and {workdir}/labels pseudo labels.

  python launch/train.py --config=configs/vise_resnet50.py --workdir=gs://... or /path
  python launch/train.py --config=configs/demo.py --workdir=workdirs/demo

Rerunning the same command continues from the latest checkpoint in {workdir}/train/checkpoints.
On a TPU pod, start it on every worker at once: see launch/pod.py.
"""

import cli

if __name__ == '__main__':
    cli.run_stages(['train'])
