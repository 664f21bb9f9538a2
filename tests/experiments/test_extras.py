"""experiments.extras: a command run without the experiment extras (tqdm, matplotlib, scipy)
ends in one line naming the install command, exit status 2, not a ModuleNotFoundError
traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from experiments import extras

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("train_rul", "sweep", "claims", "early_stopping", "posthoc_study", "window_check")


def run_without(hidden: str, command: str) -> subprocess.CompletedProcess[str]:
    """``python -m experiments.<command>`` in a process where ``import <hidden>`` fails as it
    does where the module is not installed (``None`` in ``sys.modules``)."""
    code = (
        "import runpy, sys\n"
        f"sys.modules[{hidden!r}] = None\n"
        f"sys.argv = ['{command}']\n"
        f"runpy.run_module('experiments.{command}', run_name='__main__', alter_sys=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.mark.parametrize("hidden", extras.EXTRAS)
def test_train_rul_without_an_extra_names_the_install_command(hidden):
    done = run_without(hidden, "train_rul")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"python -m experiments.train_rul: error: {hidden} not installed (the experiment "
        'extras); run pip install -e ".[experiments]"'
    ]
    assert done.stdout == ""  # nothing loaded or trained before


@pytest.mark.parametrize("command", COMMANDS[1:])
def test_every_command_without_the_extras_names_the_install_command(command):
    done = run_without("scipy", command)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"python -m experiments.{command}: error: scipy not installed")
    assert line.endswith(f"run {extras.INSTALL}")


def test_nothing_is_missing_where_the_extras_are_installed():
    assert extras.missing() == []
    extras.require("prog")  # returns
