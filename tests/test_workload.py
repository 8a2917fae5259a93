"""Workload files: every example parses; each class of error names the file, the line and what
was expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.workloads import EXAMPLES, SMALL, write_small
from tools.workload import (
    Choice,
    Compact,
    Create,
    Free,
    Gpu,
    LogNormal,
    Mesa,
    Noise,
    PageCache,
    Probe,
    Repeat,
    Uniform,
    Wait,
    WorkloadError,
    load_workload,
    mesa_buckets,
    parse_workload,
    walk,
)

# Workload files (sweep-*.toml and fleet-*.toml are specs for gemfs sweep / fleet: test_sweep.py)
EXAMPLE_FILES = sorted(
    p for p in EXAMPLES.glob("*.toml") if not p.name.startswith(("sweep-", "fleet-"))
)


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing needle."""
    for i, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in text")


def error_for(tmp_path: Path, text: str) -> WorkloadError:
    path = write_small(tmp_path, text, "bad.toml")
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    err = info.value
    assert err.file == str(path)
    assert str(err).startswith(f"{path}:{err.line}: ")
    return err


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLE_FILES}
    assert {
        "compaction-test.toml",
        "desktop.toml",
        "game-level-load.toml",
        "ml-training.toml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_every_example_parses(path: Path) -> None:
    w = load_workload(path)
    assert w.name == path.stem
    assert w.description
    assert path.read_text().lstrip().startswith("#"), "each example says what it models"
    big = path.stem in ("desktop-hour", "unified-memory-llm")  # the scale examples
    assert 64 << 20 <= w.pool <= (128 << 30 if big else 512 << 20)
    assert w.ticks > 0


def test_small_workload_has_every_phase_kind() -> None:
    w = parse_workload(SMALL, "small.toml")
    kinds = {type(p) for p in walk(w.phases)}
    assert kinds == {Create, PageCache, Gpu, Free, Noise, Probe, Compact, Wait, Repeat}
    assert w.pool == 32 << 20
    assert w.seed == 5
    assert w.compactor.proactiveness == 50
    assert w.compactor.interval_s == pytest.approx(0.1)
    churn = w.phases[3]
    assert isinstance(churn, Repeat)
    assert churn.times == 3
    assert len(churn.phases) == 5
    gpu = churn.phases[1]
    assert isinstance(gpu, Gpu)
    assert gpu.write
    assert gpu.repeat == 3
    assert gpu.duration_s == pytest.approx(0.03)
    assert gpu.interval_s == pytest.approx(0.02)
    probe = w.phases[-3]
    assert isinstance(probe, Probe)
    assert probe.count == "all"
    assert probe.hold


def test_unknown_key(tmp_path: Path) -> None:
    text = SMALL.replace("  bind = true", "  bnd = true")
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "bnd = true")
    assert "unknown key 'bnd'" in err.message
    assert "did you mean 'bind'" in err.message
    assert "expected one of: bind, count, fill, kind, name, size, start_offset, tag" in err.message
    assert "phase 4 (repeat) > do 1 (create)" in err.message


def test_unknown_key_inside_an_inline_table(tmp_path: Path) -> None:
    text = SMALL.replace('min = "16KiB"', 'minimum = "16KiB"')
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "minimum")
    assert "unknown key 'minimum'" in err.message
    assert "did you mean 'min'" in err.message


def test_unknown_top_level_table(tmp_path: Path) -> None:
    text = SMALL.replace("[compactor]", "[compacter]")
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "[compacter]")
    assert "unknown key 'compacter'" in err.message


def test_bad_value(tmp_path: Path) -> None:
    text = SMALL.replace("proactiveness = 50", "proactiveness = 150")
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "proactiveness = 150")
    assert "proactiveness must be between 0 and 100, not 150" in err.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bogus", "bad ttm_pool 'bogus' (a size, a percentage, or 0 for no pooling)"),
        ("150%", "ttm_pool '150%' must be between 0% and 100%"),
        ("64MiB", "ttm_pool '64MiB' is larger than the pool"),  # SMALL's pool is 32MiB
    ],
)
def test_bad_ttm_pool_names_its_line(tmp_path: Path, value: str, expected: str) -> None:
    text = SMALL.replace("[compactor]", f'[design]\nttm_pool = "{value}"\n\n[compactor]')
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "ttm_pool =")
    assert err.message == f"[design]: {expected}"
    good = SMALL.replace("[compactor]", '[design]\nttm_pool = "8MiB"\n\n[compactor]')
    assert load_workload(write_small(tmp_path, good, "good.toml")).ttm_pool == "8MiB"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('pool = "32MiB"', 'pool = "33MiB"', "multiple of 4MiB"),
        ('dist = "mesa"', 'dist = "gauss"', "dist must be one of fixed | uniform"),
        ('type = "unmovable"', 'type = "pinned"', "type must be one of unmovable | movable"),
        ("fill = 0.5\nsize = { dist", "fill = 1.5\nsize = { dist", "fill must be at most 1"),
        ('count = "all"', 'count = "many"', 'count must be a number or "all"'),
        ('kind = "compact"', 'kind = "compactify"', "kind must be one of create | page-cache"),
        ('"1MiB"]', '"1XB"]', "bad size '1XB'"),
        ('max = "512KiB"', 'max = "8KiB"', "max (8KiB) is below min (16KiB)"),
        (
            "  every = 3\n  offset = 1",
            "  every = 3\n  offset = 3",
            "offset must be between 0 and 2",
        ),
        ('max = "1MiB" }', 'max = "64MiB" }', "do not fit the pool"),
    ],
)
def test_bad_values(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in SMALL
    text = SMALL.replace(old, new, 1)
    err = error_for(tmp_path, text)
    assert expected in err.message
    changed = next(line for line in new.splitlines() if line not in old.splitlines())
    assert err.line == line_of(text, changed.strip())


def test_bad_type(tmp_path: Path) -> None:
    text = SMALL.replace("  count = 40", '  count = "forty"')
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, 'count = "forty"')
    assert "count must be an integer, not a string 'forty'" in err.message


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    text = SMALL.replace("seed = 5", "seed = true")
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "seed = true")
    assert "seed must be an integer, not a boolean" in err.message


def test_missing_required_key(tmp_path: Path) -> None:
    text = SMALL.replace('  tag = "buf"\n  count = 40', "  count = 40")
    err = error_for(tmp_path, text)
    # The table that lacks it: the [[phase.do]] header of the create step.
    assert err.line == line_of(text, "count = 40") - 2
    assert text.splitlines()[err.line - 1].strip() == "[[phase.do]]"
    assert "missing required key 'tag'" in err.message


def test_missing_one_of(tmp_path: Path) -> None:
    text = SMALL.replace("  every = 3\n  offset = 1\n", "")
    err = error_for(tmp_path, text)
    assert "missing required key: one of 'every', 'fraction', 'count', 'all'" in err.message


def test_two_of_one_of(tmp_path: Path) -> None:
    text = SMALL.replace("  fraction = 0.3\n", "  fraction = 0.3\n  count = 3\n")
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "count = 3")
    assert "give only one of 'fraction', 'count'" in err.message


def test_missing_pool_and_phases(tmp_path: Path) -> None:
    err = error_for(tmp_path, 'name = "x"\n')
    assert err.line == 1
    assert "missing required key 'pool'" in err.message
    err = error_for(tmp_path, 'pool = "8MiB"\n')
    assert "missing required key 'phase'" in err.message


def test_toml_syntax_error(tmp_path: Path) -> None:
    text = SMALL.replace('pool = "32MiB"', "pool = 32MiB")
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "pool = 32MiB")
    assert "not valid TOML" in err.message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="cannot read"):
        load_workload(tmp_path / "nope.toml")


def test_mesa_buckets() -> None:
    b = mesa_buckets()
    kib = 1 << 10
    assert b[:7] == (4 * kib, 8 * kib, 12 * kib, 16 * kib, 20 * kib, 24 * kib, 28 * kib)
    assert b[7:11] == (32 * kib, 40 * kib, 48 * kib, 56 * kib)
    assert b[-1] == 64 << 20
    assert list(b) == sorted(set(b))
    # 4, 8, 12 KiB, then four per power of two from 16 KiB to 32 MiB, then 64 MiB itself.
    assert len(b) == 3 + 4 * 12 + 1
    sizes = Mesa(median=64 * kib, sigma=2.0).sample(np.random.default_rng(1), 2000)
    assert set(sizes.tolist()) <= set(b)


@settings(max_examples=50, deadline=None)
@given(
    lo=st.integers(1, 1 << 20),
    span=st.integers(0, 4 << 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_size_distributions_stay_in_range(lo: int, span: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    page = 4096
    for dist in (
        Uniform(min=lo, max=lo + span),
        LogNormal(median=lo + span // 2, sigma=1.5, min=lo, max=lo + span),
    ):
        sizes = dist.sample(rng, 64)
        assert np.all(sizes % page == 0)
        assert np.all(sizes >= max(page, (lo // page) * page))
        assert np.all(sizes <= -(-(lo + span) // page) * page)
    choice = Choice(sizes=(lo, lo + span), weights=(1.0, 0.0))
    assert set(choice.sample(rng, 16).tolist()) == {-(-lo // page) * page}


def test_same_seed_same_sizes() -> None:
    w1 = parse_workload(SMALL)
    w2 = parse_workload(SMALL)
    assert w1 == w2


def test_frame_loop_key(tmp_path: Path) -> None:
    """keep_ms on a gpu phase: a frame loop of the phase's last batch; it needs interval_ms."""
    looped = SMALL.replace("interval_ms = 20", "interval_ms = 20\n  keep_ms = 500")
    assert looped != SMALL
    gpu = next(p for p in walk(parse_workload(looped, "w.toml").phases) if isinstance(p, Gpu))
    assert gpu.keep_s == pytest.approx(0.5)
    assert gpu.interval_s == pytest.approx(0.02)
    text = SMALL.replace("interval_ms = 20", "keep_ms = 500")
    err = error_for(tmp_path, text)
    assert err.line == line_of(text, "keep_ms = 500")
    assert "keep_ms needs interval_ms > 0" in err.message
