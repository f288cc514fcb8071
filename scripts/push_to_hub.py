"""`python scripts/push_to_hub.py ...` == `stagediff push ...` (see `--help`)."""

import sys

from stagediff.pipelines.cli import main

if __name__ == "__main__":
    main(["push", *sys.argv[1:]])
