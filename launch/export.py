"""Exports a trained backbone for evaluation, or imports torchvision / VisE weights as one.

  # the latest checkpoint of the run in {workdir}/train -> {workdir}/export/vise
  python launch/export.py --config=configs/demo.py --workdir=workdirs/demo

  # one step of another run's checkpoints, somewhere else
  python launch/export.py --config=configs/vise_resnet50.py --workdir=/data/vise \\
      --config.export.source=/data/other/train/checkpoints --config.export.step=20000 \\
      --config.export.out=/data/exports/other_20k

  # the published VisE ResNet-50 trunk (.pth needs pip install -e '.[torch]'; .safetensors not)
  python launch/export.py --config=configs/vise_resnet50.py --workdir=/data/vise \\
      --config.export.source=vise_r50.pth --config.export.out=/data/exports/vise_250m

An export is export.json + variables/ (plain Orbax); with config.export.torch (the default) it
also holds torchvision.safetensors and, where torch is installed, torchvision.pth, loadable by
torchvision.models.resnetXX().load_state_dict(..., strict=False). See README.md.
"""

import cli

if __name__ == '__main__':
    cli.run_stages(['export'])
