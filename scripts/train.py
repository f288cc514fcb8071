"""`accelerate launch scripts/train.py ...` == `stagediff train ...` (see `--help`)."""

import sys

from stagediff.pipelines.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
