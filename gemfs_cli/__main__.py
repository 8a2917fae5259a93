"""``python -m gemfs_cli``: the same command line as ``gemfs``."""

from gemfs_cli.main import main

main(prog_name="gemfs")
