"""Runs the cluster stage: embeddings and reactions -> pseudo labels in {workdir}/labels.

  python launch/cluster.py --config=configs/demo.py --workdir=workdirs/demo
"""

import cli

if __name__ == '__main__':
    cli.run_stages(['cluster'])
