"""Checkpoint sources as plugins: each module of this package registers one kind of trajectory.

Adding a source is one file: a `Source` subclass (or a `FolderSource` one, for checkpoint folders on disk) decorated
with `@register_source`. A module of this package is found by itself; one elsewhere is named in the config's
`source_plugins` (a module name, or the path of a .py file), so that a user's source needs no edit of qtraj.
See docs/sources.md.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from functools import cache
from pathlib import Path

from qtraj.schema import ConfigError
from qtraj.sources.base import SOURCES, Source, register_source

__all__ = ["SOURCES", "Source", "register_source", "source_classes", "source_of", "sources", "trajectory_names"]


@cache
def _builtin() -> tuple[type[Source], ...]:
    """The sources of this package (imported once: each module registers its own)."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in ("base", "folder"):
            importlib.import_module(f"{__name__}.{module.name}")
    return tuple(SOURCES.values())


@cache
def _plugin(spec: str) -> tuple[type[Source], ...]:
    """The sources a plugin module registers: `spec` is a module name or the path of a .py file."""
    before = dict(SOURCES)
    try:
        if spec.endswith(".py"):
            path = Path(spec).resolve()
            name = f"qtraj_source_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look their module up there
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except (ImportError, OSError) as error:
        raise ConfigError(f"config key 'source_plugins': {spec!r} cannot be imported ({error}); name a module on the "
                          "Python path or the path of a .py file (relative to the working folder)") from error
    added = tuple(cls for key, cls in SOURCES.items() if before.get(key) is not cls)
    if not added:
        raise ConfigError(f"config key 'source_plugins': {spec!r} registers no source; decorate its Source subclass "
                          "with @qtraj.sources.register_source")
    return added


def source_classes(config: dict) -> list[type[Source]]:
    """The source classes of `config`: the built-in ones and those of its `source_plugins`, in trajectory order."""
    plugins = config.get("source_plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(spec, str) for spec in plugins):
        raise ConfigError(f"config key 'source_plugins': {plugins!r} is not a list of module names or .py files")
    return list(_classes(tuple(plugins)))


@cache
def _classes(plugins: tuple[str, ...]) -> tuple[type[Source], ...]:
    """The source classes of a config naming `plugins` (Snakemake asks once per job while it builds the DAG)."""
    classes = {cls.key: cls for cls in _builtin()}
    for spec in plugins:
        for cls in _plugin(spec):
            if cls.key in classes and classes[cls.key] is not cls:
                raise ConfigError(f"config key 'source_plugins': {spec!r} registers a source for the key "
                                  f"{cls.key!r}, which {classes[cls.key].__name__} has; choose another key")
            classes[cls.key] = cls
    return tuple(sorted(classes.values(), key=lambda cls: cls.order))


def sources(config: dict) -> list[Source]:
    """Every source of `config`, bound to it, in trajectory order."""
    return [cls(config) for cls in source_classes(config)]


def trajectory_names(config: dict) -> list[str]:
    """Every trajectory of the config, source by source (the `run` column of every table)."""
    return [name for source in sources(config) for name in source.names()]


def source_of(config: dict, name: str) -> Source:
    """The source of trajectory `name`."""
    for source in sources(config):
        if name in source.names():
            return source
    raise KeyError(f"{name!r} is not a trajectory of this config; trajectories: "
                   f"{', '.join(trajectory_names(config)) or 'none'}")
