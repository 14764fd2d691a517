"""`ray job submit --working-dir . -- python jobs/augment.py --windows A:B --stream S ...`

Same arguments as `exfm augment`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["augment", *sys.argv[1:]]))
