"""Writes the synthetic demo world as posts (JSONL + JPEG) into {workdir}/world.

  python launch/generate_demo.py --config=configs/demo.py --workdir=workdirs/demo
"""

import cli

if __name__ == '__main__':
    cli.run_stages(['demo_world'])
