"""`python scripts/super_resolve.py INPUTS --model DIR --out DIR` == `stagediff super-resolve ...` (see `--help`)."""

import sys

from stagediff.pipelines.cli import main

if __name__ == "__main__":
    main(["super-resolve", *sys.argv[1:]])
