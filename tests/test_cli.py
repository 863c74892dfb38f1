"""The command line: every command has --help, and --help stays light (no qlib/mlflow/lightgbm import)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from qlib_ext.cli import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, (*prefix, name)))
    return out


COMMANDS = _commands(main)


def test_the_promised_commands_exist():
    names = {" ".join(c) for c in COMMANDS}
    for expected in ("run", "submit", "worker", "status", "leaderboard", "expand", "demo", "store serve",
                     "store url", "data synth", "data import-csv", "data info", "cache ls", "cache clear",
                     "retry", "cancel", "mlflow serve", "bench"):
        assert expected in names, expected


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "--help" in result.output
    doc = result.output.split("\n\n", 2)[1].strip()
    assert doc, f"{' '.join(command)} has no description"


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from qlib_ext.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('qlib', 'mlflow', 'lightgbm', 'optuna', 'pandas') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_qlib_ext_errors_become_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    result = CliRunner().invoke(main, ["expand", str(bad)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "bad.yaml" in result.output
    assert "Traceback" not in result.output
