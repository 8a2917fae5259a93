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
from tools.calibrate.guest import (
    DEFAULT_SCENARIOS,
    SCENARIOS,
    GuestError,
    KernelResult,
    Scenario,
    parse_pattern,
    run_guest,
)

CALIBRATE_DEFAULTS = DEFAULT_SCENARIOS
MIN_MEMORY_MIB = 128
KNOBS_NOTE = {
    "kernel": (
        "knobs from each boot's kernel state before compaction (never its outcome): MemFree at "
        "the start; background: the share of it free in non-movable pageblocks; phase: where "
        "the chunk stream starts in its pageblock, read by the guest program from "
        "/proc/self/pagemap. Model seeds draw only when kswapd has gone to sleep during the "
        "hugepage loop (tools/calibrate/model.py)."
    ),
    "default": (
        "knobs: built-in defaults measured on Debian 6.1, 512 MiB, TCG (see "
        "tools/calibrate/model.py)."
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


def _patterns(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[Scenario]:
    out = []
    for i, text in enumerate(value, 1):
        try:
            out.append(parse_pattern(text, f"pattern-{i}"))
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return out


def comparison_table(comparisons: Sequence[Comparison], title: str) -> Table:
    """Two rows per scenario (kernel over boots, model over boots × seeds): mean [range] of the
    fractions of the ideal (free pages // 512)."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("scenario", no_wrap=True)
    t.add_column("side")
    t.add_column("n", justify="right")
    for name in ("before", "after", "recovered", "hugepages"):
        t.add_column(name, justify="right")
    t.add_column("blocked", justify="center")
    t.add_column("verdict")
    for c in comparisons:
        compacted = c.kernel.scenario.compact
        sides = (
            ("kernel", c.kernel_spread, c.kernel_shape),
            ("model", c.model_spread, c.model_shape),
        )
        for side, sp, mean in sides:
            verdict = ""
            if side == "model":
                style = "green" if c.agree else "bold red"
                verdict = f"[{style}]{c.verdict}[/]"
            t.add_row(
                c.name if side == "kernel" else "",
                side,
                str(sp["fraction_before"].n),
                sp["fraction_before"].text(),
                sp["fraction_after"].text() if compacted else "-",
                sp["recovered_fraction"].text() if compacted else "-",
                f"{sp['hugepages_fraction'].text()} ({mean.hugepages}/{mean.ideal_order9})",
                ("yes" if mean.blocked else "no") if compacted else "-",
                verdict,
                end_section=side == "model",
            )
    return t


def knobs_table(comparisons: Sequence[Comparison]) -> Table:
    t = Table(title="model knobs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("scenario", no_wrap=True)
    t.add_column("pattern")
    t.add_column("MemFree", justify="right")
    t.add_column("background", justify="right")
    t.add_column("phase per boot (pagemap)")
    for c in comparisons:
        k = c.model.knobs
        sc = c.kernel.scenario
        pattern = sc.pattern or (
            f"chunk={sc.chunk_kib}KiB,fill={sc.fill:g},free={sc.free},pin={sc.pins},"
            f"compact={'yes' if sc.compact else 'no'}"
        )
        phases = ", ".join("?" if r.phase_pages is None else str(r.phase_pages) for r in c.kernels)
        t.add_row(
            c.name, pattern, f"{k.mem_free_kib // 1024} MiB", f"{k.background_fraction:.3f}", phases
        )
    return t


@click.command("calibrate")
@click.argument("scenarios", nargs=-1, type=click.Choice(list(SCENARIOS)), metavar="[SCENARIO]...")
@click.option(
    "--pattern",
    "patterns",
    multiple=True,
    callback=_patterns,
    metavar="PATTERN",
    help="Your own pattern, e.g. 'chunk=512KiB,fill=0.7,free=011,pin=01,compact=no' (free: "
    "rhythm over chunk indices, 1 = unmap; pin: rhythm over survivors, 1 = pin; compact=no: "
    "huge pages from direct compaction only). Repeatable.",
)
@click.option(
    "--boots", default=1, show_default=True, type=click.IntRange(1, 20), help="Kernel boots."
)
@click.option(
    "--seeds",
    default=3,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Model seeds per boot (they draw when kswapd sleeps during the hugepage loop).",
)
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
    help="Model knobs from each boot's kernel before-state, or the built-in defaults.",
)
def calibrate_cmd(
    scenarios: tuple[str, ...],
    patterns: list[Scenario],
    boots: int,
    seeds: int,
    memory: int,
    out: Path | None,
    accel: str,
    knob_source: str,
) -> None:
    """Run fragmentation SCENARIOs on a real Linux kernel (QEMU) and on the model; compare.

    Scenarios: movable (80% of free memory in 1 MiB chunks, every other chunk freed, compact),
    pinned (the survivors long-term pinned first), mixed (half of them pinned), and the same
    with 64 KiB chunks; *-nocompact skip compaction (huge pages from direct compaction only).
    Default: movable pinned mixed movable-64k and the three *-nocompact; with --pattern, the
    patterns (and any SCENARIOs named). Kernel and model are compared as distributions: over
    --boots boots and, per boot, --seeds model seeds.

    \b
    Examples:
      gemfs calibrate                     # the default scenarios, in a QEMU guest
      gemfs calibrate pinned mixed --boots 3 --seeds 5 --out out/calibrate
      gemfs calibrate --pattern 'chunk=512KiB,fill=0.7,free=011,pin=01,compact=no'
    """
    chosen: list[str | Scenario] = [*dict.fromkeys(scenarios), *patterns]
    if not chosen:
        chosen = list(CALIBRATE_DEFAULTS)
    names = [s if isinstance(s, str) else s.name for s in chosen]
    console = Console(width=max(Console().width, 150))
    err = Console(stderr=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_dir = out
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="gemfs-calibrate-"))
    t0 = time.monotonic()
    per_boot: dict[str, list[KernelResult]] = {}
    infos: list[RunInfo] = []
    for boot in range(boots):
        boot_dir = log_dir / f"boot-{boot + 1}" if boots > 1 else log_dir
        status = f"booting Linux in QEMU ({boot + 1}/{boots}) for {', '.join(names)}"
        try:
            with err.status(f"{status} (logs in {boot_dir})"):
                run = run_guest(
                    chosen, boot_dir, memory, accel=cast(Literal["auto", "kvm", "tcg"], accel)
                )
        except (GuestError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        infos.append(RunInfo.of(run, memory))
        for name, result in run.results.items():
            per_boot.setdefault(name, []).append(result)
    info = infos[-1]
    info.boots, info.seeds = boots, seeds
    guest_s = sum(i.guest_total_s for i in infos)
    info.guest_total_s = round(guest_s, 2)
    knobs: KnobSource = kernel_knobs if knob_source == "kernel" else default_knobs
    t1 = time.monotonic()
    with err.status("running the model") as st:
        comparisons = calibrate(
            per_boot, knobs, progress=lambda n: st.update(f"running the model: {n}"), seeds=seeds
        )
    info.model_total_s = round(time.monotonic() - t1, 2)

    title = f"kernel ({boots} boot(s)) vs model ({seeds} seed(s) per boot), {memory} MiB guest"
    console.print(comparison_table(comparisons, title))
    console.print(
        "mean [min–max] over boots (kernel) and boots × seeds (model). before/after: free 2 MiB "
        "blocks as a fraction of the ideal (free pages // 512), around compact_memory; "
        "recovered: (after − before) / (ideal − before); hugepages: what the nr_hugepages loop "
        "got / the ideal (mean count / ideal); blocked: recovered < 0.25 (*-nocompact: no "
        "compact_memory)",
        highlight=False,
    )
    console.print(f"tolerance: {TOLERANCE.reason}", highlight=False)
    console.print(knobs_table(comparisons))
    console.print(KNOBS_NOTE[knob_source], highlight=False)
    for c in comparisons:
        for why in c.failures:
            console.print(f"[red]{c.name}[/]: {why}")
    fallback = f" ({info.kvm_fallback})" if info.kvm_fallback else ""
    console.print(
        f"guest: {info.accel.upper()}{fallback}, /init after {info.boot_s:.1f} s, "
        f"{guest_s:.1f} s in all ({boots} boot(s)); model: {info.model_total_s:.1f} s; "
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
