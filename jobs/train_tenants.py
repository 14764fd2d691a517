"""`ray job submit --working-dir . -- python -m jobs.train_tenants --windows A:B [--follow] ...`

Same arguments as `exfm train`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
