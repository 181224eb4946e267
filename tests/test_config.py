"""Config: where it is found, what it may hold, and how errors are reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from geartask.config import find_config, load_config, parse_hostport
from geartask.errors import ConfigError

from helpers import REPO, missing_in_this_environment


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_a_file_live_in_the_working_directory(tmp_path, monkeypatch):
    """No config anywhere: built-in defaults, with every relative path under the working
    directory (never the package's folder, which may be site-packages)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEARTASK_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if Path("/etc/geartask/config.yaml").exists():
        missing_in_this_environment("this machine has /etc/geartask/config.yaml")
    cfg = load_config()
    assert cfg.source is None
    assert cfg.servers == ["127.0.0.1:4730"]
    assert cfg.server.host == "127.0.0.1"
    assert cfg.log.dir == tmp_path / "logs"
    assert cfg.plugins.paths == [tmp_path / "plugins"]
    assert cfg.server.queue.path == tmp_path / "var" / "gearmand-queue.sqlite"


def test_search_order(tmp_path, monkeypatch):
    explicit = write(tmp_path / "a" / "explicit.yaml", "servers: ['127.0.0.1:1001']\n")
    env = write(tmp_path / "b" / "env.yaml", "servers: ['127.0.0.1:1002']\n")
    cwd_file = write(tmp_path / "c" / "config.yaml", "servers: ['127.0.0.1:1003']\n")
    monkeypatch.chdir(cwd_file.parent)
    monkeypatch.setenv("GEARTASK_CONFIG", str(env))
    assert load_config(explicit).servers == ["127.0.0.1:1001"]
    assert load_config().servers == ["127.0.0.1:1002"]
    monkeypatch.delenv("GEARTASK_CONFIG")
    assert load_config().servers == ["127.0.0.1:1003"]
    user = write(tmp_path / "xdg" / "geartask" / "config.yaml", "servers: ['127.0.0.1:1004']\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert find_config() == user
    user.unlink()
    if not Path("/etc/geartask/config.yaml").exists():
        assert find_config() is None


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_config(write(tmp_path / "conf" / "c.yaml",
                            "log: {dir: mylogs}\nplugins: {paths: [p1, /abs/p2]}\n"))
    assert cfg.log.dir == tmp_path / "conf" / "mylogs"
    assert cfg.plugins.paths == [tmp_path / "conf" / "p1", Path("/abs/p2")]
    assert cfg.server.queue.path == tmp_path / "conf" / "var" / "gearmand-queue.sqlite"


def test_servers_override(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "servers: ['127.0.0.1:1']\n"), servers="127.0.0.1:5,127.0.0.2:6")
    assert cfg.servers == ["127.0.0.1:5", "127.0.0.2:6"]
    assert cfg.server_addresses == [("127.0.0.1", 5), ("127.0.0.2", 6)]
    with pytest.raises(ConfigError, match=r"--servers: bad port"):
        load_config(tmp_path / "c.yaml", servers="127.0.0.1:notaport")


@pytest.mark.parametrize("text, key, message", [
    ("colour: blue\n", "colour", "unknown key"),
    ("worker: {thraeds: 3}\n", "worker.thraeds", "unknown key (known here: grace, "),
    ("worker: {threads: many}\n", "worker.threads", "expected an integer, got 'many'"),
    ("worker: {threads: 0}\n", "worker.threads", "must be greater than 0"),
    ("worker: {retries: -1}\n", "worker.retries", "must not be negative"),
    ("sender: {connect_timeout: -2.5}\n", "sender.connect_timeout", "must be greater than 0"),
    ("sender: {priority: urgent}\n", "sender.priority", "must be one of low, normal, high"),
    ("sender: {background: 'yes'}\n", "sender.background", "expected true or false"),
    ("servers: ['localhost:99999']\n", "servers[0]", "must be 1-65535"),
    ("servers: ['127.0.0.1:4730', 'host:abc']\n", "servers[1]", "not a number"),
    ("servers: []\n", "servers", "needs at least one"),
    ("servers: '127.0.0.1:4730'\n", "servers", "expected a list"),
    ("log: {level: loud}\n", "log.level", "must be one of debug, info"),
    ("worker: {shell: {allow: [echo, 3]}}\n", "worker.shell.allow[1]", "expected a string"),
    ("server: {queue: {type: mysql}}\n", "server.queue.type", "must be one of sqlite, postgresql, none"),
    ("server: {queue: {type: postgresql}}\n", "server.queue.url", "is needed with server.queue.type: postgresql"),
    ("server: {queue: {type: postgresql, url: 'host=db'}}\n", "server.queue.url", "must be a postgresql:// URL"),
    ("server: {queue: {table: 'q; DROP TABLE x'}}\n", "server.queue.table", "must be a plain table name"),
    ("outcomes: {store: postgresql}\n", "outcomes.url", "is needed with outcomes.store: postgresql"),
    ("worker:\n", "worker", "has no value"),
])
def test_validation_errors_name_the_key(tmp_path, text, key, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == key
    assert str(exc.value).startswith(f"{path}: {key}: ")
    assert message in str(exc.value)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path / "bad.yaml", "servers:\n  - 127.0.0.1:4730\nworker: {threads: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.line == 4 and exc.value.column is not None
    assert str(exc.value).startswith(f"{path}:4:")
    assert "YAML syntax error" in str(exc.value)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "bad.yaml", "- a\n- b\n"))


@pytest.mark.parametrize("text, expected", [("h:1", ("h", 1)), ("h", ("h", 4730)), ("[::1]:5", ("::1", 5))])
def test_parse_hostport(text, expected):
    assert parse_hostport(text) == expected


def test_check_command_exits_2_without_traceback(tmp_path):
    path = write(tmp_path / "bad.yaml", "worker: {threads: -3}\n")
    proc = subprocess.run([sys.executable, "-m", "geartask", "--config", str(path), "check"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}: worker.threads: must be greater than 0" in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "geartask", "check"], capture_output=True, text=True,
                        cwd=REPO, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "config.yaml" in ok.stdout and "eg" in ok.stdout


# -- files that are not configs, keys given twice, numbers that are not numbers (issue 11) -----

@pytest.mark.parametrize("text, key, message", [
    ("worker: {job_timeout: .nan}\n", "worker.job_timeout", "must be a finite number, got nan"),
    ("worker: {job_timeout: .inf}\n", "worker.job_timeout", "must be a finite number, got inf"),
    ("worker: {retry_backoff: -.inf}\n", "worker.retry_backoff", "must be a finite number, got -inf"),
    ("sender: {submit_timeout: .NaN}\n", "sender.submit_timeout", "must be a finite number"),
    ("worker: {shell: {heartbeat: .Inf}}\n", "worker.shell.heartbeat", "must be a finite number"),
    ("server: {keepalive: {idle: 0}}\n", "server.keepalive.idle", "must be greater than 0"),
    ("server: {keepalive: {interval: 40000}}\n", "server.keepalive.interval", "must be at most 32767"),
    ("server: {keepalive: {count: 200}}\n", "server.keepalive.count", "must be at most 127"),
    ("server: {keepalive: {count: 2.5}}\n", "server.keepalive.count", "expected an integer"),
    ("server: {keepalive: {idle: 5, every: 3}}\n", "server.keepalive.every", "unknown key"),
])
def test_nan_infinity_and_keepalive_limits_are_refused(tmp_path, text, key, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == key and message in str(exc.value)


def test_server_keepalive_defaults_and_values(tmp_path):
    from geartask.server import LocalServer
    cfg = load_config(write(tmp_path / "c.yaml", "server: {keepalive: {idle: 5, interval: 2, count: 4}}\n"))
    assert LocalServer.from_config(cfg).keepalive == (5, 2, 4)
    default = load_config(write(tmp_path / "d.yaml", "{}\n")).server.keepalive
    assert default.idle + default.interval * default.count <= 60  # "within about a minute"


@pytest.mark.parametrize("text, line, column, key", [
    ("servers: ['127.0.0.1:1']\nservers: ['127.0.0.1:2']\n", 2, 1, "servers"),
    ("worker:\n  threads: 2\n  grace: 1\n  threads: 3\n", 4, 3, "threads"),
    ("worker: {shell: {allow: [echo], allow: [rm]}}\n", 1, 33, "allow"),
])
def test_a_key_given_twice_is_an_error_with_its_line(tmp_path, text, line, column, key):
    """PyYAML keeps the last of two equal keys without a word: a second `allow` would replace
    the first list unseen."""
    path = write(tmp_path / "twice.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert (exc.value.line, exc.value.column) == (line, column)
    assert f"duplicate key {key!r} (first given at line" in str(exc.value)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    text = "x-base: &base {threads: 2, grace: 1}\nworker:\n  <<: *base\n  threads: 5\n"
    with pytest.raises(ConfigError, match="x-base: unknown key"):  # merges parse; the key is still unknown
        load_config(write(tmp_path / "m.yaml", text))
    cfg = load_config(write(tmp_path / "m2.yaml", "worker: {<<: {threads: 2, grace: 1}, threads: 5}\n"))
    assert (cfg.worker.threads, cfg.worker.grace) == (5, 1.0)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"servers: ['127.0.0.1:1']\n# caf\xe9\n"), ":2:6: not UTF-8 text (byte 0xe9)"),
    (lambda p: p.mkdir(), ": is a directory, not a config file"),
    (lambda p: p.write_text("# padding\n" * 200_000), ": larger than 1024 KiB: not a config file"),
    (lambda p: p.write_text("[" * 50_000), ": nested too deeply to be a config"),
    (lambda p: p.symlink_to("/dev/zero"), ": is not a regular file (a device or socket)"),
], ids=["latin-1", "directory", "2 MB", "50000 levels deep", "/dev/zero"])
def test_a_file_that_is_not_a_config_says_what_it_is(tmp_path, make, message):
    path = tmp_path / "config.yaml"
    make(path)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(str(path)) and message in str(exc.value)


def test_a_directory_named_by_the_environment_is_reported_as_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GEARTASK_CONFIG", str(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config()
