"""`python -m saestream` runs the `saestream` command."""

from saestream.tools.cli import main

main()
