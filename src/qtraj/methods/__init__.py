"""Quantization methods as plugins: each module in this package registers one or more methods.

Adding a method is adding one file here that subclasses `QuantizationMethod` and decorates it with
`@register`; `discover()` imports every module of the package, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from qtraj.methods.base import METHODS, QuantizationMethod, QuantSpec, register

__all__ = ["METHODS", "QuantizationMethod", "QuantSpec", "discover", "get_method", "register"]


def discover() -> dict[str, type[QuantizationMethod]]:
    """Import every module of this package (which registers its methods) and return the registry."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(METHODS)


def get_method(name: str) -> QuantizationMethod:
    methods = discover()
    if name not in methods:
        raise KeyError(f"unknown quantization method {name!r}; known methods: {', '.join(sorted(methods))}")
    return methods[name]()
