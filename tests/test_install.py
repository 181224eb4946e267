"""geartask installed with pip (not editable), used from an empty folder as a new user would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, processes, wait_until
from workers import worker_connections


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with geartask pip-installed from a copy of the source (so the build
    writes nothing into the repository)."""
    base = tmp_path_factory.mktemp("pip")
    src = base / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "geartask", src / "geartask", ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"pip install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    site = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    return venv, site


def test_only_geartask_is_installed_as_a_top_level_package(installed):
    venv, site = installed
    (dist,) = site.glob("geartask-*.dist-info")
    assert (dist / "top_level.txt").read_text().split() == ["geartask"]
    record = [line.split(",")[0] for line in (dist / "RECORD").read_text().splitlines()]
    outside = [p for p in record if not p.startswith(("geartask/", dist.name + "/", "../../../bin/"))]
    assert outside == []
    for alias in ("geartask", "runworkers", "send_job_client", "manage_client"):
        assert (venv / "bin" / alias).exists()
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "from geartask import JobSender, Admin, JobRejected, AttemptFailed, hookimpl, load_config"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_new_user_starts_from_an_empty_folder(installed, gearmand, tmp_path):
    """geartask --version, geartask init, a worker and a sender from that folder against a real
    gearmand; afterwards nothing was written under site-packages."""
    venv, site = installed
    bin_ = venv / "bin"
    before = _files(site)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GEARTASK_CONFIG"}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg"))

    def run(*args, timeout=60):
        return subprocess.run([str(bin_ / args[0]), *args[1:]], capture_output=True, text=True, cwd=work,
                              env=env, timeout=timeout)

    r = run("geartask", "--version")
    assert r.returncode == 0 and r.stdout.startswith("geartask "), r.stderr
    r = run("geartask", "init")
    assert r.returncode == 0, r.stderr
    assert (work / "config.yaml").is_file() and (work / "plugins" / "example.py").is_file()
    r = run("geartask", "init")
    assert r.returncode == 2 and "already exists" in r.stderr  # never overwrites by accident
    cfg = work / "config.yaml"
    cfg.write_text(cfg.read_text().replace("127.0.0.1:4730", gearmand.address, 1))
    assert run("geartask", "check").returncode == 0

    with open(tmp_path / "worker.out", "w") as out:
        worker = subprocess.Popen([str(bin_ / "geartask"), "worker", "--name", "pipw", "--threads", "2"],
                                  cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: sum(" pipw:" in line for line in worker_connections(gearmand.address)) >= 3
                   or worker.poll() is not None, 20, message="the pip-installed worker attached")
        assert worker.poll() is None, (tmp_path / "worker.out").read_text()[-2000:]
        r = run("geartask", "send", "plugin", "example", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        results = [json.loads(line) for line in r.stdout.splitlines()]
        assert sorted(x["result"]["greeting"] for x in results) == ["hello, geartask", "hello, you"]
        r = run("send_job_client", "job", "example.hello", '{"name": "alias"}', "--json")
        assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["result"]["greeting"] == "hello, alias"
        assert run("manage_client", "status").returncode == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    assert worker.returncode == 0
    assert (work / "logs").is_dir()  # the logs went where the config is, not into the package
    written = sorted(_files(site) - before)
    assert written == [], written[:20]


def _readme_block(heading: str) -> list[str]:
    """The lines of the first ```sh block under ``heading`` in README.md, as a user copies them."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    return block.splitlines()


def _namespace_problem() -> str | None:
    r = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"no user+network namespace here: {r.stderr.strip()}"


def test_the_readme_pip_quick_start_works_pasted_into_a_fresh_shell(installed, tmp_path):
    """README's "Installed with pip" commands, exactly as written, in a fresh bash in a network
    namespace of this test's own (so its gearmand can take the config's 127.0.0.1:4730)."""
    reason = _namespace_problem()
    if reason:
        pytest.skip(reason)
    venv, _ = installed
    lines = _readme_block("## Installed with pip")
    assert lines[0].startswith("pip install .")
    src = tmp_path / "clone"  # `pip install .` runs in a clone: the installed copy's source
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "geartask", src / "geartask", ignore=shutil.ignore_patterns("__pycache__"))
    script = tmp_path / "pasted.sh"
    # set -e: a command that fails stops here; `wait`: the background worker ended (by the
    # README's own shutdown line), so nothing of the run outlives it.
    script.write_text("set -e\n" + "\n".join(lines) + "\nwait\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GEARTASK_CONFIG", "VIRTUAL_ENV")}
    # the user's own HOME: pip's settings (its indexes) live there; ./config.yaml is found first
    # no network in the namespace: pip falls back to local indexes at once
    env.update(PATH=f"{venv / 'bin'}:{os.environ['PATH']}:/usr/sbin", PIP_RETRIES="0", PIP_QUIET="1")
    shell = subprocess.Popen(["unshare", "-rn", "bash", "--noprofile", "--norc", "-c",
                              f"ip link set lo up && exec bash --noprofile --norc {script}"],
                             cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = shell.communicate(timeout=300)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)  # the session this test started, by its id
            shell.wait()
        for pid, (argv, _) in processes().items():  # a gearmand (its own session) left by a failed run
            if any(str(src) in arg for arg in argv):
                os.kill(pid, signal.SIGKILL)
    assert shell.returncode == 0, out[-3000:] + err[-3000:]
    assert "2 job(s): 2 complete" in out and "hello, geartask" in out, out
    assert "gearmand on 127.0.0.1:4730 stopped" in out, out
    assert "worker stopped" in err, err[-2000:]

    # geartask init prints the same steps, one a line, so its hint pastes as well
    i = next(n for n, line in enumerate(lines) if line.startswith("cd myfleet"))
    readme_steps = [line.split("#")[0].strip() for line in lines[i:]]
    hint = out.split("next, in this shell:\n", 1)[1].splitlines()
    printed = [line.strip() for line in hint[:len(readme_steps)] if line.startswith("  ")]
    assert printed == readme_steps[:len(printed)] and len(printed) == 4, (printed, readme_steps)


def test_without_a_config_file_the_error_says_none_was_found_and_where_it_looked(installed, tmp_path):
    venv, _ = installed
    env = {k: v for k, v in os.environ.items() if k != "GEARTASK_CONFIG"}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    r = subprocess.run([str(venv / "bin" / "geartask"), "send", "plugin", "example"], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "unknown plugin 'example'; available: none; no config file was found" in r.stderr
    assert f"{tmp_path}/config.yaml" in r.stderr and f"{tmp_path}/xdg/geartask/config.yaml" in r.stderr
    assert "Traceback" not in r.stderr
