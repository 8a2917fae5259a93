"""``gemfs calibrate``: the model against a real Linux kernel, scenario by scenario."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

import click
from rich import box
from rich.console import Console
from rich.table import Table

from gemfs.mm.types import parse_size
from tools.calibrate.compare import (
    TOLERANCE,
    Comparison,
    KnobSource,
    RunInfo,
    calibrate,
    default_knobs,
    kernel_knobs,
    write_json,
    write_plot,
)
from tools.calibrate.guest import SCENARIOS, GuestError, run_guest

CALIBRATE_DEFAULTS = ("movable", "pinned", "mixed", "movable-64k")
MIN_MEMORY_MIB = 128
KNOBS_NOTE = {
    "kernel": (
        "knobs from each scenario's kernel state before compaction (never its outcome): MemFree "
        "at the start; background: the share of it free in non-movable pageblocks; offset: "
        "where the chunk stream starts (pages, mod the chunk size) so the holes split into the "
        "orders the kernel shows. The kernel does not show which half of a pageblock the stream "
        "started in; where that matters (mixed) the model plays both phases."
    ),
    "default": (
        "knobs: built-in defaults measured on Debian 6.1, 512 MiB, TCG (see "
        "tools/calibrate/model.py); the model plays both phases where that matters (mixed)."
    ),
}


def parse_memory(value: str) -> int:
    """``512MiB`` → 512; ValueError with the reason otherwise."""
    nbytes = parse_size(value)
    if nbytes % (1 << 20):
        raise ValueError(f"{value} is not a whole number of MiB")
    mib = nbytes >> 20
    if mib < MIN_MEMORY_MIB:
        raise ValueError(f"the guest needs at least {MIN_MEMORY_MIB}MiB, not {value}")
    return mib


def _memory(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_memory(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def comparison_table(comparisons: Sequence[Comparison], title: str) -> Table:
    """Two rows per scenario (kernel, model); fractions are of the ideal, free pages // 512."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("scenario", no_wrap=True)
    t.add_column("side")
    for name in ("before", "after", "recovered", "hugepages"):
        t.add_column(name, justify="right")
    t.add_column("blocked", justify="center")
    t.add_column("verdict")
    for c in comparisons:
        for side, s in (("kernel", c.kernel_shape), ("model", c.model_shape)):
            verdict = ""
            if side == "model":
                style = "green" if c.agree else "bold red"
                verdict = f"[{style}]{c.verdict}[/]" + (" (other phase)" if c.other_phase else "")
            t.add_row(
                c.name if side == "kernel" else "",
                side,
                f"{s.fraction_before:.2f}",
                f"{s.fraction_after:.2f}",
                f"{s.recovered_fraction:.2f}",
                f"{s.hugepages}/{s.ideal_order9}",
                ("yes" if s.blocked else "no") if c.kernel.scenario.compact else "-",
                verdict,
                end_section=side == "model",
            )
    return t


def knobs_table(comparisons: Sequence[Comparison]) -> Table:
    t = Table(title="model knobs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("scenario", no_wrap=True)
    t.add_column("MemFree", justify="right")
    t.add_column("background", justify="right")
    t.add_column("offset", justify="right")
    t.add_column("phases tried (offset: recovered)")
    for c in comparisons:
        k = c.model.knobs
        phases = ", ".join(
            f"{m.knobs.offset_pages}: {m.recovered_fraction:.2f}" for m in c.variants
        )
        t.add_row(
            c.name,
            f"{k.mem_free_kib // 1024} MiB",
            f"{k.background_fraction:.3f}",
            str(k.offset_pages),
            phases if len(c.variants) > 1 else "-",
        )
    return t


@click.command("calibrate")
@click.argument("scenarios", nargs=-1, type=click.Choice(list(SCENARIOS)), metavar="[SCENARIO]...")
@click.option(
    "--memory",
    default="512MiB",
    show_default=True,
    callback=_memory,
    help="Guest memory (at least 128MiB).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write calibration.json, free-blocks.png and the guest's logs here.",
)
@click.option(
    "--accel",
    type=click.Choice(["auto", "kvm", "tcg"]),
    default="auto",
    show_default=True,
    help="QEMU accelerator (auto: KVM when it works, else TCG).",
)
@click.option(
    "--knobs",
    "knob_source",
    type=click.Choice(["kernel", "default"]),
    default="kernel",
    show_default=True,
    help="Model knobs from each scenario's kernel before-state, or the built-in defaults.",
)
def calibrate_cmd(
    scenarios: tuple[str, ...],
    memory: int,
    out: Path | None,
    accel: str,
    knob_source: str,
) -> None:
    """Run fragmentation SCENARIOs on a real Linux kernel (QEMU) and on the model; compare.

    Scenarios: movable (80% of free memory in 1 MiB chunks, every other chunk freed, compact),
    pinned (the survivors long-term pinned first), mixed (half of them pinned), and the same
    with 64 KiB chunks; *-nocompact skip compaction. Default: movable pinned mixed movable-64k.
    """
    names = list(dict.fromkeys(scenarios or CALIBRATE_DEFAULTS))
    console = Console()
    err = Console(stderr=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_dir = out
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="gemfs-calibrate-"))
    t0 = time.monotonic()
    try:
        with err.status(f"booting Linux in QEMU for {', '.join(names)} (logs in {log_dir})"):
            run = run_guest(
                names, log_dir, memory, accel=cast(Literal["auto", "kvm", "tcg"], accel)
            )
    except (GuestError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    info = RunInfo.of(run, memory)
    knobs: KnobSource = kernel_knobs if knob_source == "kernel" else default_knobs
    t1 = time.monotonic()
    with err.status("running the model") as status:
        comparisons = calibrate(
            run.results, knobs, progress=lambda n: status.update(f"running the model: {n}")
        )
    info.model_total_s = round(time.monotonic() - t1, 2)

    console.print(comparison_table(comparisons, f"kernel vs model, {memory} MiB guest"))
    console.print(
        "before/after: free 2 MiB blocks as a fraction of the ideal (free pages // 512), around "
        "compact_memory; recovered: (after − before) / (ideal − before); hugepages: what "
        "nr_hugepages got after compaction / the ideal; blocked: recovered < 0.25 "
        "(*-nocompact: no compact_memory; the verdict compares what nr_hugepages got)",
        highlight=False,
    )
    console.print(f"tolerance: {TOLERANCE.reason}", highlight=False)
    console.print(knobs_table(comparisons))
    console.print(KNOBS_NOTE[knob_source], highlight=False)
    for c in comparisons:
        for why in c.failures:
            console.print(f"[red]{c.name}[/]: {why}")
    fallback = f" ({run.kvm_fallback})" if run.kvm_fallback else ""
    console.print(
        f"guest: {run.accel.upper()}{fallback}, /init after {run.boot_s:.1f} s, "
        f"{run.total_s:.1f} s in all; model: {info.model_total_s:.1f} s; "
        f"total {time.monotonic() - t0:.1f} s",
        highlight=False,
    )
    if out is not None:
        write_json(out / "calibration.json", comparisons, info)
        write_plot(out / "free-blocks.png", comparisons)
        console.print(f"wrote {out / 'calibration.json'} and {out / 'free-blocks.png'}")
    bad = [c.name for c in comparisons if not c.agree]
    if bad:
        raise click.ClickException(f"the model disagrees with the kernel on {', '.join(bad)}")
