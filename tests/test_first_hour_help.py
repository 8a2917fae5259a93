"""Issue 10, item 13: ``--help`` as a newcomer reads it, for every command.

Each command's help shows an example, every option says what it does, ``--design`` is the
same fixed choice everywhere, and ``gemfs gem create --help`` works before any driver runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from gemfs.mm.types import Design
from gemfs_cli.main import main

# Their help is another change's (the commands move to the top floor): an example and option
# help for these come with it. Remove a name from here once its help has them.


def commands(
    group: click.Group = main, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, group
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


ALL = list(commands())


def show_help(path: tuple[str, ...]) -> str:
    # No $GEMFS_DRIVER: the gem commands' help must not need a driver.
    r = CliRunner(env={"GEMFS_DRIVER": None}).invoke(main, [*path, "--help"], prog_name="gemfs")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"Usage: {' '.join(('gemfs', *path))} ")
    return r.output


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=[" ".join(p) or "gemfs" for p, _ in ALL])
def test_help_has_an_example_and_every_option_says_what_it_does(
    path: tuple[str, ...], cmd: click.Command
) -> None:
    text = show_help(path)
    assert "Example" in text, text
    example = text.split("Example", 1)[1]
    assert "gemfs " in example, text  # a command line to copy, not only prose
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"


def test_gem_create_help_without_a_driver() -> None:
    text = show_help(("gem", "create"))
    assert "Create a GEM object of SIZE" in text
    assert "--path" in text


def test_a_gem_command_without_a_driver_says_how_to_name_one() -> None:
    r = CliRunner(env={"GEMFS_DRIVER": None}).invoke(main, ["gem", "stats"])
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert r.output.splitlines()[-1] == (
        "Error: no driver socket: give gemfs gem --driver PATH (the driver's --listen) "
        "or set GEMFS_DRIVER"
    )


DESIGN_OPTIONS = [
    (path, param)
    for path, cmd in ALL
    for param in cmd.params
    if isinstance(param, click.Option) and "--design" in param.opts
]


def test_the_design_options_are_the_commands_a_user_expects() -> None:
    assert sorted(p for p, _ in DESIGN_OPTIONS) == [
        ("demo",),
        ("mount",),
        ("replay",),
        ("run",),
        ("stress",),
    ]


@pytest.mark.parametrize(
    ("path", "param"), DESIGN_OPTIONS, ids=[" ".join(p) for p, _ in DESIGN_OPTIONS]
)
def test_design_is_a_fixed_choice_everywhere(path: tuple[str, ...], param: click.Option) -> None:
    assert isinstance(param.type, click.Choice)
    assert list(param.type.choices) == [d.value for d in Design]
    r = CliRunner().invoke(main, [*path, *(["/tmp/x"] if path == ("mount",) else []), "--design",
                                  "shmem_hook"])  # fmt: skip
    assert r.exit_code == 2
    listed = ", ".join(f"'{d.value}'" for d in Design)
    assert r.output.splitlines()[-1] == (
        f"Error: Invalid value for '--design': 'shmem_hook' is not one of {listed}."
    )
