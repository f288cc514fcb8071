"""`python scripts/benchmark.py ...` == `stagediff benchmark ...` (see `--help`): training and
sampling throughput, FLOP/s, data pipeline and memory, ours vs diffusers' example loop."""

from stagediff.benchmarks.cli import main

if __name__ == "__main__":
    main()
