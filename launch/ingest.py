"""Validates the posts of config.posts.manifest into the posts store {workdir}/posts.

Rejected rows are listed in {workdir}/posts/rejected.jsonl and counted in report.json.

  python launch/ingest.py --config=configs/demo.py --workdir=workdirs/demo
"""

import cli

if __name__ == '__main__':
    cli.run_stages(['ingest'])
