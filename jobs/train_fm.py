"""`ray job submit --working-dir . -- python jobs/train_fm.py --stream S --through-window T ...`

Same arguments as `exfm fm train`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["fm", "train", *sys.argv[1:]]))
