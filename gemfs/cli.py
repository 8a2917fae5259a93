"""The `gemfs` command line."""

import click

from gemfs.cmd_bench import bench


@click.group()
def main() -> None:
    """gemfs: GEM objects on a FUSE mount, with pins, migration and compaction."""


main.add_command(bench)
