"""Starts the same command on every worker of a Cloud TPU pod slice (one process per host).

  python launch/pod.py --tpu=my-v5e-64 --zone=us-west4-a -- \
      python launch/train.py --config=configs/vise_resnet50.py --workdir=gs://bucket/run1

Each worker runs the command from --repo_dir (a checkout of this repository installed there
with `pip install -e .`); jax.distributed finds its peers from the TPU environment, so the
command is the same one you would run on a single host. --dry_run prints the gcloud command
instead of running it. Output of every worker streams back, prefixed by gcloud.
"""

import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

_TPU = flags.DEFINE_string('tpu', None, 'Name of the TPU VM (pod slice).')
_ZONE = flags.DEFINE_string('zone', None, 'Its zone, e.g. us-central2-b.')
_PROJECT = flags.DEFINE_string('project', '', 'Google Cloud project ('' = gcloud default).')
_REPO_DIR = flags.DEFINE_string('repo_dir', '~/vise_jax', 'The checkout on every worker.')
_ENV = flags.DEFINE_multi_string('env', [], 'NAME=VALUE set for the command on every worker.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the gcloud command; run nothing.')
flags.mark_flags_as_required(['tpu', 'zone'])


def worker_script(repo_dir: str, env: Sequence[str], command: Sequence[str]) -> str:
    """The shell line each worker runs: cd to the checkout, set env, run the command."""
    for item in env:
        if '=' not in item:
            raise app.UsageError(f'--env wants NAME=VALUE, got {item!r}')
    # The repo dir may start with ~, which must stay unquoted to expand on the worker.
    home, _, rest = repo_dir.partition('/') if repo_dir.startswith('~') else ('', '', repo_dir)
    target = f'{home}/{shlex.quote(rest)}' if home else shlex.quote(rest)
    exports = ''.join(f'export {shlex.quote(item)} && ' for item in env)
    return f'cd {target} && {exports}{shlex.join(command)}'


def gcloud_command(tpu: str, zone: str, project: str, script: str) -> list[str]:
    command = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, f'--zone={zone}',
               '--worker=all', f'--command={script}']
    if project:
        command.append(f'--project={project}')
    return command


def main(argv: Sequence[str]) -> None:
    command = argv[1:]
    if not command:
        raise app.UsageError('give the command to run after --, e.g. -- python launch/train.py ...')
    gcloud = gcloud_command(_TPU.value, _ZONE.value, _PROJECT.value,
                            worker_script(_REPO_DIR.value, _ENV.value, command))
    if _DRY_RUN.value:
        print(shlex.join(gcloud))
        return
    sys.exit(subprocess.call(gcloud))


if __name__ == '__main__':
    app.run(main)
