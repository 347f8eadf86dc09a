"""`python -m dualner <command> ...` (see dualner.cli)."""

from dualner.cli import main

main()
