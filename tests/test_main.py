"""The `geartask` command: one name for every role, global options passed through."""

from __future__ import annotations

import subprocess
import sys

import pytest

from geartask import __version__
from geartask.main import main, split

from helpers import REPO


def test_version_and_help(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out == f"geartask {__version__}\n"
    assert main(["version"]) == 0 and capsys.readouterr().out == f"geartask {__version__}\n"
    assert main(["--help"]) == 0 and "worker" in capsys.readouterr().out
    assert main([]) == 2 and "usage: geartask" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_global_options_are_split_from_the_command():
    assert split(["--config", "c.yaml", "-v", "send", "plugin", "eg", "--json"]) == \
        (["--config", "c.yaml", "-v"], "send", ["plugin", "eg", "--json"])
    assert split(["--servers=h:1", "worker", "--name", "w"]) == (["--servers=h:1"], "worker", ["--name", "w"])


def test_check_runs_with_the_config_given_before_the_command(make_config, gearmand, capsys):
    path, _ = make_config(gearmand)
    assert main(["--config", str(path), "check"]) == 0
    assert f"config: {path}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["-m", "geartask", "--version"], [str(REPO / "worker_client" / "runworkers.py"), "--help"],
                                  [str(REPO / "send_job_client" / "send_job_client.py"), "--help"],
                                  [str(REPO / "manage_client" / "manage_client.py"), "--help"]])
def test_the_role_scripts_and_python_m_work_from_anywhere(argv, tmp_path):
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
