"""`ray job submit --working-dir . -- python -m jobs.pipeline --storage /mnt/exfm/store [...]`

Same arguments as `exfm run`; on a cluster (RAY_ADDRESS set by `ray job submit`) the students stay
served after the job ends."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--exit", *sys.argv[1:]]))
