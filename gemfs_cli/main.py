"""The `gemfs` command line."""

import click

from gemfs_cli.cmd_bench import bench
from gemfs_cli.cmd_calibrate import calibrate_cmd
from gemfs_cli.cmd_mount import mount, umount
from gemfs_cli.cmd_run import demo, run, top
from gemfs_cli.cmd_stack import compactor_cmd, driver_cmd, gem, stress_cmd
from gemfs_cli.cmd_sweep import fleet, sweep
from gemfs_cli.cmd_trace import record_cmd, replay_cmd


@click.group()
def main() -> None:
    """gemfs: GEM objects on a FUSE mount, with pins, migration and compaction.

    \b
    Examples:
      gemfs run examples/compaction-test.toml --inproc   # the four designs, in seconds
      gemfs demo                                         # the desktop workload, real stack
      gemfs mount /tmp/gem --pool 64MiB --control /tmp/gem.sock   # then: gemfs driver ...

    Every command has --help with an example."""


main.add_command(bench)
main.add_command(calibrate_cmd)
main.add_command(mount)
main.add_command(umount)
main.add_command(driver_cmd)
main.add_command(compactor_cmd)
main.add_command(gem)
main.add_command(run)
main.add_command(top)
main.add_command(demo)
main.add_command(stress_cmd)
main.add_command(record_cmd)
main.add_command(replay_cmd)
main.add_command(sweep)
main.add_command(fleet)
