"""`accelerate launch scripts/sample.py ...` == `stagediff sample ...` (see `--help`)."""

import sys

from stagediff.pipelines.cli import main

if __name__ == "__main__":
    main(["sample", *sys.argv[1:]])
