"""``python -m gemfs``: the same command line as ``gemfs``."""

from gemfs.cli import main

main(prog_name="gemfs")
