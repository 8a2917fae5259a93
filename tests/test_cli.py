"""Every command has --help and answers bad input with one clear line; gem/compactor for real."""

from __future__ import annotations

import json
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from gemfs.mm.types import Design
from gemfs_cli.main import main
from tools.stack_backend import Stack


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


ALL = sorted(_commands(main))


def test_the_command_set() -> None:
    names = {c[0] for c in ALL}
    for expected in (
        "mount",
        "umount",
        "driver",
        "compactor",
        "gem",
        "run",
        "top",
        "demo",
        "bench",
        "stress",
        "calibrate",
    ):
        assert expected in names


@pytest.mark.parametrize("path", ALL, ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    args = list(path)
    if path[0] == "gem" and len(path) > 1:
        args = ["gem", "--driver", "x", *path[1:]]
    r = CliRunner().invoke(main, [*args, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["driver", "--control", "/nonexistent/ctl"], "no such control socket"),
        (["compactor", "--control", "/nonexistent/ctl"], "no such control socket"),
        (["compactor", "--control", "x", "--order", "11"], "--order"),
        (["compactor", "--control", "x", "--proactiveness", "101"], "--proactiveness"),
        (["gem", "--driver", "/nonexistent/sock", "create", "1MiB"], "cannot connect"),
        (["gem", "--driver", "x", "create", "1XB"], "bad size"),
        (["gem", "--driver", "x", "exec"], "OBJS"),
        (["bench", "mm", "--size", "3MiB"], "multiple of 4MiB"),
        (["stress", "--minutes", "0"], "--minutes"),
        (["stress", "--design", "bogus"], "--design"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], needle: str) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    assert needle in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.mount
@pytest.mark.e2e
def test_gem_and_compactor_commands_on_a_real_stack() -> None:
    with Stack("32MiB", Design.SHMEM_HOOK) as stack:
        env = {"GEMFS_DRIVER": str(stack.driver_sock)}
        run = CliRunner(env=env).invoke
        ids = []
        for _ in range(12):
            r = run(main, ["gem", "create", "1MiB"])
            assert r.exit_code == 0, r.output
            ids.append(json.loads(r.output)["obj"])
        r = run(main, ["gem", "exec", *map(str, ids), "--write", "--duration-ms", "20"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["data_errors"] == 0
        assert run(main, ["gem", "wait", str(ids[0])]).exit_code == 0
        for i in ids[::2]:
            assert run(main, ["gem", "close", str(i)]).exit_code == 0
        r = run(main, ["compactor", "--control", str(stack.control), "--once"])
        assert r.exit_code == 0, r.output
        assert "migrated" in r.output
        r = run(main, ["gem", "stats"])
        stats = json.loads(r.output)
        assert stats["objects"] == 6
        assert stats["data_errors"] == 0
        assert stats["migrate_calls"] > 0
        r = run(main, ["gem", "close", "999"])
        assert r.exit_code != 0
        assert "ENOENT" in r.output
