"""`gemfs bench ...`: benchmarks that print numbers (and a ratio against a baseline)."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks: print figures and ratios against a baseline measured in the same run."""


@bench.command("mm")
@click.option("--size", default="4GiB", show_default=True, help="Pool size for the main figures.")
@click.option("--big", default="16GiB", show_default=True, help="Large pool that must run at all.")
def bench_mm_cmd(size: str, big: str) -> None:
    """Allocator, object allocation, migration and full-compaction speed of the model."""
    from gemfs.mm.pool import check_pool_size
    from tools.bench_mm import bench_mm

    for s in (size, big):
        try:
            check_pool_size(s)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    for f in bench_mm(size, big):
        value = f"{f.value:,.3f}" if f.unit == "s" else f"{f.value:,.0f}"
        if f.unit == "bytes/frame":
            value = f"{f.value:.1f}"
        click.echo(f"{f.name:<42} {value:>14} {f.unit:<12} {f.note}")
