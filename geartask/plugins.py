"""Finding, loading and calling plugins (pluggy).

Plugins come from the ``*.py`` modules in ``plugins.paths`` (the module's file name is the
plugin's name) and from the ``geartask.plugins`` entry-point group, so a pip-installed
package can add tasks. Names are discovered without importing anything; only the plugins
asked for are imported, and any failure names the plugin and its file. Nothing starts
half-loaded: a broken plugin is an error, never a skipped one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

import pluggy

from . import hookspecs
from .config import Config, no_config_note
from .errors import ConfigError, GeartaskError, JobDefinitionError, PluginError
from .jobs import JobDefinition

ENTRY_POINT_GROUP = "geartask.plugins"
BUILTIN_TASKS = ("shell",)  # served by every worker itself (geartask.shell.task)


RESERVED_PREFIX = "geartask."  # geartask.control:*, geartask.outcomes, geartask.outcomes.query, ...


def is_reserved_task(name: str) -> bool:
    """Task names geartask serves itself: the shell task, the workers' control functions, the
    outcomes collector's functions (everything under ``geartask.``)."""
    return name in BUILTIN_TASKS or name.startswith(RESERVED_PREFIX)


@dataclass
class PluginSource:
    name: str
    file: str  # a path, or "entry point module:attr"
    load: Callable[[], Any]


def discover(config: Config) -> dict[str, PluginSource]:
    """Every plugin that could be loaded, by name, without importing any of them."""
    found: dict[str, PluginSource] = {}
    for folder in config.plugins.paths:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for file in sorted(folder.glob("*.py")):
            if file.name.startswith("_"):
                continue
            found.setdefault(file.stem, PluginSource(file.stem, str(file),
                                                     functools.partial(_import_file, file)))
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            raise PluginError(f"two plugins have this name: {found[ep.name].file} and entry point {ep.value}",
                              ep.name)
        found[ep.name] = PluginSource(ep.name, f"entry point {ep.value}", ep.load)
    return found


def plugin_path_warnings(config: Config) -> list[str]:
    """A line per ``plugins.paths`` folder that is not there (a typo, a folder not deployed):
    not an error, since the entry points may bring every plugin, but then no plugin comes
    from it and a worker serves fewer tasks than meant, so check and the worker say so."""
    source = getattr(config, "source", None)
    out = []
    for i, folder in enumerate(config.plugins.paths):
        folder = Path(folder)
        if folder.is_dir():
            continue
        what = "is not a folder" if folder.exists() else "does not exist"
        line = f"{source or '<config>'}: plugins.paths[{i}]: {folder} {what}; no plugins are loaded from it"
        out.append(line + (f"; {no_config_note()}" if source is None else ""))
    return out


def _import_file(file: Path) -> ModuleType:
    mod_name = f"geartask_plugin_{file.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


@dataclass
class Plugins:
    """The loaded plugins and the hooks they implement."""

    config: Config
    pm: pluggy.PluginManager
    files: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def register(self, plugin: Any, name: str, file: str = "<built-in>") -> None:
        """Register an already-imported plugin object (built-ins use this too)."""
        if name in self.files:
            raise PluginError("a plugin of this name is already loaded", name, file)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            self.pm.unregister(name=name)
            raise PluginError(f"invalid hook: {e}", name, file) from None
        self.files[name] = file

    def _call(self, hook: str, **kwargs: Any) -> Iterable[tuple[str, Any]]:
        """Call one hook plugin by plugin, so an error can name the plugin that raised."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():  # registration order
            args = {a: kwargs[a] for a in impl.argnames}
            try:
                result = impl.function(**args)
            except GeartaskError:
                raise
            except BaseException as e:  # sys.exit() in a hook must not end the role with status 0
                raise PluginError(f"hook {hook} raised {type(e).__name__}: {e}",
                                  impl.plugin_name, self.files.get(impl.plugin_name)) from e
            yield impl.plugin_name, result

    def tasks(self) -> dict[str, tuple[Callable[[Any], Any], str]]:
        """Every task the loaded plugins provide: name -> (callable, plugin name)."""
        tasks: dict[str, tuple[Callable[[Any], Any], str]] = {}
        for plugin, result in self._call("geartask_tasks", config=self.config):
            if result is None:
                continue
            if not isinstance(result, dict):
                raise PluginError(f"geartask_tasks must return a dict of name -> callable, got {type(result).__name__}",
                                  plugin, self.files.get(plugin))
            for name, fn in result.items():
                if not isinstance(name, str) or not name or any(c.isspace() for c in name) or not callable(fn):
                    raise PluginError(f"bad task {name!r}: names are non-empty without spaces, values callable",
                                      plugin, self.files.get(plugin))
                if is_reserved_task(name):
                    raise PluginError(f"task {name!r} is geartask's own (the built-in shell task or a "
                                      f"worker control function); choose another name",
                                      plugin, self.files.get(plugin))
                if name in tasks:
                    other = tasks[name][1]
                    raise PluginError(f"task {name!r} is registered by both {other!r} ({self.files.get(other)}) "
                                      f"and {plugin!r}", plugin, self.files.get(plugin))
                tasks[name] = (fn, plugin)
        return tasks

    def sink(self, hook: str) -> Callable[..., None] | None:
        """A caller of ``hook`` (geartask_job_done/geartask_job_failed) over every plugin that
        implements it, each call's exception logged and swallowed; None when none does (so
        the worker's per-job path pays nothing)."""
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        if not impls:
            return None
        from .logs import get_logger
        log = get_logger("geartask.plugins")

        def call(**kwargs: Any) -> None:
            for impl in impls:
                try:
                    impl.function(**{a: kwargs[a] for a in impl.argnames})
                except BaseException as e:  # a sink must not fail the job, nor end the thread
                    log.error("plugin hook raised; the job is not affected", hook=hook, plugin=impl.plugin_name,
                              error=f"{type(e).__name__}: {e}")
        return call

    def schedules(self) -> list[tuple[str, int, Any]]:
        """Every schedule definition the plugins yield, unchecked: (plugin, index, definition)."""
        out: list[tuple[str, int, Any]] = []
        for plugin, result in self._call("geartask_schedules", config=self.config):
            if result is None:
                continue
            try:
                items = list(result)
            except GeartaskError:
                raise
            except TypeError:
                raise PluginError(f"geartask_schedules must yield schedule mappings, got {type(result).__name__}",
                                  plugin, self.files.get(plugin)) from None
            except BaseException as e:  # SystemExit, KeyboardInterrupt raised by the plugin's generator
                raise PluginError(f"hook geartask_schedules raised {type(e).__name__}: {e}",
                                  plugin, self.files.get(plugin)) from e
            out += [(plugin, i, item) for i, item in enumerate(items)]
        return out

    def jobs(self) -> list[tuple[str, JobDefinition]]:
        """Every job definition the loaded plugins yield, validated: (plugin name, job)."""
        return list(self.iter_jobs())

    def iter_jobs(self) -> Iterator[tuple[str, JobDefinition]]:
        """jobs() one at a time, as the plugins yield them: memory stays flat however many."""
        for plugin, result in self._call("geartask_jobs", config=self.config):
            if result is None:
                continue
            file = self.files.get(plugin)
            try:
                items = iter(result)
            except TypeError:
                raise PluginError(f"geartask_jobs must yield job definitions, got {type(result).__name__}",
                                  plugin, file) from None
            i = 0
            while True:
                try:
                    item = next(items)
                except StopIteration:
                    break
                except GeartaskError:
                    raise
                except BaseException as e:  # SystemExit, KeyboardInterrupt raised by the plugin's generator
                    raise PluginError(f"hook geartask_jobs raised {type(e).__name__}: {e}", plugin, file) from e
                i += 1
                try:
                    job = JobDefinition.from_any(item, f"plugin {plugin!r} job #{i}")
                except JobDefinitionError as e:
                    e.args = (f"{e} ({file})",)
                    raise
                yield plugin, job


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(config: Config, only: list[str] | None = None) -> Plugins:
    """Import and register plugins: ``only`` if given, else ``plugins.enabled``, else all found."""
    available = discover(config)
    wanted = list(only) if only else list(config.plugins.enabled) or list(available)
    unknown = [n for n in wanted if n not in available]
    have = ", ".join(sorted(available)) or "none"
    if unknown and not only:  # from the config file: say where
        i = wanted.index(unknown[0])
        raise ConfigError(f"unknown plugin {unknown[0]!r}; available: {have}",
                          str(getattr(config, "source", None) or "<config>"), f"plugins.enabled[{i}]")
    if unknown:
        note = f"; {no_config_note()}" if getattr(config, "source", True) is None else ""
        raise PluginError(f"unknown plugin{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"available: {have}{note}")
    plugins = Plugins(config, new_manager())
    for name in wanted:
        src = available[name]
        try:
            obj = src.load()
        except SyntaxError as e:
            raise PluginError(f"syntax error at line {e.lineno}: {e.msg}", name, src.file) from None
        except BaseException as e:  # sys.exit(0) at import would otherwise end the role with status 0
            raise PluginError(f"cannot import: {type(e).__name__}: {e}", name, src.file) from None
        plugins.register(obj, name, src.file)
    return plugins
