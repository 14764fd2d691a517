"""`ray job submit --working-dir . -- python jobs/start_fm.py --shards 2 ...`: start the detached
FM group on the cluster (same arguments as `exfm fm start`); it outlives this job."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["fm", "start", *sys.argv[1:]]))
