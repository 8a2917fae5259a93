"""Issue 10, item 10: the workload format as a newcomer writes it.

A tag that no phase created and a pool too small for what a phase asks are errors with the
file and the line, from ``gemfs run``; every key the parser accepts is documented in
examples/README.md and in tools/workload.py's docstring, and the README links the former.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import tools.workload
from gemfs.mm.costs import CostTable
from gemfs_cli.main import main
from tests.workloads import EXAMPLES
from tools.workload import _KEYS, KINDS

ROOT = EXAMPLES.parent

HEAD = """\
pool = "16MiB"

[[phase]]
name = "buffers"
kind = "create"
tag = "buf"
count = 4
size = "64KiB"
"""


def run_error(tmp_path: Path, text: str) -> tuple[Path, str]:
    """``gemfs run FILE --inproc`` on a bad file: exit 1 and one line, which is returned."""
    path = tmp_path / "w.toml"
    path.write_text(text)
    r = CliRunner().invoke(main, ["run", str(path), "--inproc", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    return path, lines[0]


def line_of(text: str, needle: str, start: int = 1) -> int:
    for i, line in enumerate(text.splitlines(), start=1):
        if i >= start and needle in line:
            return i
    raise AssertionError(needle)


def test_free_of_a_tag_no_phase_created(tmp_path: Path) -> None:
    text = HEAD + '\n[[phase]]\nkind = "free"\ntag = "buff"\nall = true\n'
    path, line = run_error(tmp_path, text)
    n = line_of(text, 'tag = "buff"')
    assert line == (
        f"Error: {path}:{n}: phase 2 (free): tag 'buff' is not created by any phase before "
        "this one (create, page-cache and noise phases create tags; so far: buf); "
        "did you mean 'buf'?"
    )


def test_gpu_on_a_list_with_an_unknown_tag(tmp_path: Path) -> None:
    text = HEAD + '\n[[phase]]\nkind = "gpu"\ntag = ["buf", "textures"]\n'
    path, line = run_error(tmp_path, text)
    assert line.startswith(f"Error: {path}:{line_of(text, 'textures')}: phase 2 (gpu): ")
    assert "tag 'textures' is not created by any phase before this one" in line


def test_a_tag_created_only_later_is_an_error_too(tmp_path: Path) -> None:
    text = (
        'pool = "16MiB"\n\n[[phase]]\nkind = "gpu"\ntag = "buf"\n\n'
        '[[phase]]\nkind = "create"\ntag = "buf"\ncount = 1\nsize = "4KiB"\n'
    )
    path, line = run_error(tmp_path, text)
    assert line.startswith(f"Error: {path}:5: phase 1 (gpu): tag 'buf' is not created")
    assert "so far: none yet" in line


def test_inside_a_repeat_the_body_counts_and_mistakes_name_their_line(tmp_path: Path) -> None:
    ok = (
        HEAD
        + '\n[[phase]]\nkind = "repeat"\ntimes = 2\n\n'
        + '  [[phase.do]]\n  kind = "free"\n  tag = "tmp"\n  all = true\n\n'
        + '  [[phase.do]]\n  kind = "create"\n  tag = "tmp"\n  count = 2\n  size = "8KiB"\n'
    )
    path = tmp_path / "ok.toml"
    path.write_text(ok)
    r = CliRunner().invoke(main, ["run", str(path), "--inproc", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output  # the free frees last round's: "tmp" comes from the body
    bad = ok.replace('  tag = "tmp"\n  all', '  tag = "tpm"\n  all')
    path, line = run_error(tmp_path, bad)
    n = line_of(bad, 'tag = "tpm"')
    assert line.startswith(f"Error: {path}:{n}: phase 2 (repeat) > do 1 (free): tag 'tpm'")
    assert "did you mean 'tmp'?" in line


def test_a_pool_too_small_for_a_phase_says_so(tmp_path: Path) -> None:
    text = HEAD.replace("count = 4", "count = 320")
    path, line = run_error(tmp_path, text)
    assert line == (
        f"Error: {path}:{line_of(text, 'count = 320')}: phase 1 (create): 320 objects of at least "
        "64KiB need 20MiB; the pool is 16MiB, too small for this workload (make the pool "
        "larger or the count smaller)"
    )


def test_noise_beyond_the_pool_says_so(tmp_path: Path) -> None:
    text = HEAD + '\n[[phase]]\nkind = "noise"\ntag = "slab"\ntype = "unmovable"\npages = 8192\n'
    path, line = run_error(tmp_path, text)
    assert line.startswith(f"Error: {path}:{line_of(text, 'pages = 8192')}: phase 2 (noise): ")
    assert "8192 allocations of at least 4KiB need 32MiB; the pool is 16MiB, too small" in line


def test_an_object_larger_than_the_pool_names_the_pool(tmp_path: Path) -> None:
    text = HEAD.replace('size = "64KiB"', 'size = "32MiB"')
    path, line = run_error(tmp_path, text)
    assert line == (
        f"Error: {path}:{line_of(text, 'size = ')}: phase 1 (create): size: objects up to 32MiB "
        "do not fit the pool (16MiB)"
    )


@pytest.mark.parametrize(
    "example",
    # sweep-*/fleet-* are specs for gemfs sweep and gemfs fleet, not workloads (test_sweep.py)
    sorted(p for p in EXAMPLES.glob("*.toml") if not p.name.startswith(("sweep-", "fleet-"))),
    ids=lambda p: p.name,
)
def test_the_examples_pass_the_new_checks(example: Path) -> None:
    tools.workload.load_workload(example)


# -- the documentation --------------------------------------------------------------------------
def documented_keys() -> dict[str, tuple[str, ...]]:
    costs = tuple(f.name for f in dataclasses.fields(CostTable))
    return {
        "top level": ("name", "description", "pool", "seed", "page_size"),
        "[compactor]": ("proactiveness", "interval_ms", "order"),
        "[driver]": ("migratetype",),
        "[design]": ("movablecore", "confine_granule", "ttm_pool"),
        "[costs]": costs,
        "sizes": ("dist", "min", "max", "median", "sigma", "sizes", "weights"),
        **{kind: _KEYS[kind] for kind in KINDS},
    }


@pytest.mark.parametrize(
    "doc", [ROOT / "examples" / "README.md", ROOT / "tools" / "workload.py"], ids=["md", "py"]
)
def test_every_key_is_documented(doc: Path) -> None:
    text = doc.read_text()
    if doc.suffix == ".py":
        text = tools.workload.__doc__ or ""
    missing = [
        f"{where}: {key}"
        for where, keys in documented_keys().items()
        for key in keys
        if not re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text)
    ]
    assert not missing, missing
    for kind in KINDS:
        assert f"`{kind}`" in text or f"{kind} " in text, kind
    for table in ("[costs]", "[driver]", "[design]", "[compactor]"):
        assert table in text, table


def test_the_readme_links_the_workload_format() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(examples/README.md)" in readme


def test_a_pool_that_fills_up_under_the_run_says_so(tmp_path: Path) -> None:
    """Each phase fits, but what the rounds keep does not: the run says the pool was small."""
    text = (
        'pool = "16MiB"\n\n[[phase]]\nkind = "repeat"\ntimes = 10\n\n'
        '  [[phase.do]]\n  kind = "create"\n  tag = "buf"\n  count = 10\n  size = "256KiB"\n'
        "  bind = true\n"
    )
    for times, small in ((10, True), (2, False)):
        path = tmp_path / f"w{times}.toml"
        path.write_text(text.replace("times = 10", f"times = {times}"))
        out = str(tmp_path / f"o{times}")
        r = CliRunner().invoke(
            main, ["run", str(path), "--inproc", "--design", "pinned", "--out", out]
        )
        assert r.exit_code == 0, r.output
        output = " ".join(r.output.split())  # as one line, however the console wrapped it
        assert ("too small" in output) is small, output
        if small:
            assert (
                "note: the pool (16MiB) was too small for this workload: allocations failed "
                'even after dropping page cache (pinned 4; "allocation failures" in the '
                "table); give it a larger pool"
            ) in output
