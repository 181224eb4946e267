"""Plugins: loading from paths and entry points, and every way a plugin can be bad."""

from __future__ import annotations

import sys
import textwrap

import pytest

from geartask.config import load_config
from geartask.errors import JobDefinitionError, PluginError
from geartask.plugins import load_plugins

from helpers import REPO


def config_with(tmp_path, plugins: dict[str, str], enabled=()):
    folder = tmp_path / "plugs"
    folder.mkdir(exist_ok=True)
    for name, body in plugins.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(body))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"plugins: {{paths: [{folder}], enabled: {list(enabled)}}}\n")
    return load_config(cfg_file)


GOOD = """
from geartask import hookimpl

@hookimpl
def geartask_tasks():
    return {"%(name)s.up": lambda job: str(job.data).upper()}

@hookimpl
def geartask_jobs(config):
    yield {"task": "%(name)s.up", "data": "x", "priority": "high"}
"""


def test_eg_plugin_gives_tasks_and_jobs():
    plugins = load_plugins(load_config(REPO / "config.yaml"), only=["eg"])
    tasks = plugins.tasks()
    assert {"eg.reverse", "eg.flaky", "eg.wordcount"} <= set(tasks)
    jobs = [j for _, j in plugins.jobs()]
    assert any(j.task == "shell" for j in jobs) and any(j.task == "eg.flaky" for j in jobs)


def test_load_from_path(tmp_path):
    cfg = config_with(tmp_path, {"alpha": GOOD % {"name": "alpha"}, "beta": GOOD % {"name": "beta"}})
    plugins = load_plugins(cfg)
    assert sorted(plugins.names) == ["alpha", "beta"]
    assert set(plugins.tasks()) == {"alpha.up", "beta.up"}
    (plugin, job), _ = plugins.jobs()
    assert plugin == "alpha" and job.task == "alpha.up" and job.priority == "high"


def test_enabled_limits_what_loads(tmp_path):
    cfg = config_with(tmp_path, {"alpha": GOOD % {"name": "alpha"}, "broken": "import nonexistent_mod\n"},
                      enabled=["alpha"])
    assert load_plugins(cfg).names == ["alpha"]  # the broken one is never imported


def test_load_from_entry_point(tmp_path, monkeypatch):
    # What pip leaves behind for a package declaring a geartask.plugins entry point.
    site = tmp_path / "site"
    (site / "epplug").mkdir(parents=True)
    (site / "epplug" / "__init__.py").write_text(GOOD % {"name": "ep"})
    dist = site / "epplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[geartask.plugins]\nepplug = epplug\n")
    monkeypatch.syspath_prepend(str(site))
    cfg = config_with(tmp_path, {})
    plugins = load_plugins(cfg, only=["epplug"])
    assert plugins.files["epplug"] == "entry point epplug"
    assert "ep.up" in plugins.tasks()


@pytest.mark.parametrize("body, message", [
    ("def broken(:\n", "syntax error at line 1"),
    ("import nonexistent_module_xyz\n", "cannot import: ModuleNotFoundError"),
    ("raise RuntimeError('boom at import')\n", "cannot import: RuntimeError: boom at import"),
    ("from geartask import hookimpl\n@hookimpl\ndef geartask_taks():\n    return {}\n", "invalid hook"),
])
def test_bad_plugin_names_plugin_and_file(tmp_path, body, message):
    cfg = config_with(tmp_path, {"bad": body})
    with pytest.raises(PluginError) as exc:
        load_plugins(cfg)
    assert exc.value.plugin == "bad"
    assert str(tmp_path / "plugs" / "bad.py") in str(exc.value)
    assert message in str(exc.value)


def test_hook_that_raises(tmp_path):
    cfg = config_with(tmp_path, {"raiser": """
        from geartask import hookimpl
        @hookimpl
        def geartask_tasks():
            raise ValueError("no tasks today")
        @hookimpl
        def geartask_jobs():
            yield {"task": "a"}
            raise KeyError("half way")
    """})
    plugins = load_plugins(cfg)
    with pytest.raises(PluginError, match=r"plugin 'raiser' \(.*raiser.py\): hook geartask_tasks raised ValueError: no tasks today"):
        plugins.tasks()
    with pytest.raises(PluginError, match="hook geartask_jobs raised KeyError"):
        plugins.jobs()


def test_two_plugins_one_task_name(tmp_path):
    cfg = config_with(tmp_path, {"one": GOOD % {"name": "same"}, "two": GOOD % {"name": "same"}})
    with pytest.raises(PluginError, match=r"task 'same.up' is registered by both 'one' .*one.py.* and 'two'"):
        load_plugins(cfg).tasks()


@pytest.mark.parametrize("task", ["shell", "geartask.control:w1:10.0.0.1:42"])
def test_geartask_own_task_names_are_refused(tmp_path, task):
    body = f"from geartask import hookimpl\n\n@hookimpl\ndef geartask_tasks():\n    return {{{task!r}: lambda job: 1}}\n"
    cfg = config_with(tmp_path, {"squatter": body})
    with pytest.raises(PluginError, match=r"plugin 'squatter' \(.*squatter.py\): task .* is geartask's own"):
        load_plugins(cfg).tasks()


def test_unknown_plugin_lists_those_available(tmp_path):
    cfg = config_with(tmp_path, {"alpha": GOOD % {"name": "alpha"}})
    with pytest.raises(PluginError, match=r"unknown plugin 'nope'; available: alpha"):
        load_plugins(cfg, only=["nope"])


def test_bad_job_definition_names_plugin(tmp_path):
    cfg = config_with(tmp_path, {"jobs": """
        from geartask import hookimpl
        @hookimpl
        def geartask_jobs():
            yield {"data": 1}
    """})
    with pytest.raises(JobDefinitionError, match=r"plugin 'jobs' job #1: 'task' must be"):
        load_plugins(cfg).jobs()
    cfg = config_with(tmp_path, {"jobs": """
        from geartask import hookimpl
        @hookimpl
        def geartask_jobs():
            yield {"task": "t", "data": object()}
    """})
    with pytest.raises(JobDefinitionError, match="cannot be serialised"):
        load_plugins(cfg).jobs()


# -- plugins that exit, and names the config gets wrong (issue 11) ------------------------------

@pytest.mark.parametrize("body, message", [
    ("import sys\nsys.exit(0)\n", "cannot import: SystemExit: 0"),
    ("import sys\nsys.exit('bye')\n", "cannot import: SystemExit: bye"),
    ("raise KeyboardInterrupt\n", "cannot import: KeyboardInterrupt"),
])
def test_a_plugin_that_exits_at_import_is_a_plugin_error(tmp_path, body, message):
    cfg = config_with(tmp_path, {"quitter": body})
    with pytest.raises(PluginError) as exc:
        load_plugins(cfg)
    assert exc.value.plugin == "quitter" and message in str(exc.value)
    assert "geartask_plugin_quitter" not in sys.modules


@pytest.mark.parametrize("hook, call", [("geartask_tasks", "tasks"), ("geartask_jobs", "jobs")])
@pytest.mark.parametrize("raised", ["SystemExit(0)", "KeyboardInterrupt()"])
def test_a_hook_that_exits_is_a_plugin_error(tmp_path, hook, call, raised):
    cfg = config_with(tmp_path, {"quitter": f"""
        from geartask import hookimpl
        @hookimpl
        def {hook}():
            raise {raised}
    """})
    with pytest.raises(PluginError, match=rf"plugin 'quitter' \(.*quitter.py\): hook {hook} raised "
                                          rf"{raised.split('(')[0]}"):
        getattr(load_plugins(cfg), call)()


def test_a_jobs_generator_that_exits_half_way_is_a_plugin_error(tmp_path):
    cfg = config_with(tmp_path, {"quitter": """
        import sys
        from geartask import hookimpl
        @hookimpl
        def geartask_jobs():
            yield {"task": "a"}
            sys.exit(0)
    """})
    with pytest.raises(PluginError, match="hook geartask_jobs raised SystemExit"):
        load_plugins(cfg).jobs()


def test_an_unknown_name_in_plugins_enabled_names_the_file_and_the_key(tmp_path):
    from geartask.errors import ConfigError
    cfg = config_with(tmp_path, {"alpha": GOOD % {"name": "alpha"}}, enabled=["alpha", "alhpa"])
    with pytest.raises(ConfigError) as exc:
        load_plugins(cfg)
    assert exc.value.key == "plugins.enabled[1]" and exc.value.path == str(tmp_path / "c.yaml")
    assert str(exc.value) == f"{tmp_path / 'c.yaml'}: plugins.enabled[1]: unknown plugin 'alhpa'; available: alpha"
