"""The `gemfs` command line."""

import click


@click.group()
def main() -> None:
    """gemfs: GEM objects on a FUSE mount, with pins, migration and compaction."""
