"""Runs the embed stage: comments of {workdir}/posts -> float16 shards in {workdir}/embeddings.

  python launch/embed.py --config=configs/demo.py --workdir=workdirs/demo
"""

import cli

if __name__ == '__main__':
    cli.run_stages(['embed'])
