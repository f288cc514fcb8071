"""Developer tools that measure stagediff, apart from the library: `stagediff benchmark` (cli.py)."""
