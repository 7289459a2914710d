"""The method registry: `@register_method("name")` on a `Method` subclass; `get_method(name)` → the class.

Built-in methods live one per module in this package and are imported here so they register themselves; a method
module that is not present (yet) is simply not offered.
"""

from __future__ import annotations

import importlib

from qcompiler import QCompilerError

_REGISTRY: dict[str, type] = {}

# Modules of this package that define methods, imported on first use of the registry.
_BUILTIN_MODULES = ("none", "rtn", "gptq", "spqr", "affinequant", "affinequant_spqr")
_loaded = False


def register_method(name: str):
    """Class decorator: register a `Method` subclass under `name` (sets `cls.name`)."""

    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise QCompilerError(f"method '{name}' is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        for attr in ("Config", "quantize"):
            if not hasattr(cls, attr):
                raise QCompilerError(f"method '{name}' ({cls.__name__}) has no {attr}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        full = f"{__name__}.{module}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:  # the method exists but one of its own imports is missing: a real error
                raise


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> type:
    """The method class registered as `name`; QCompilerError listing the available ones otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QCompilerError(f"unknown method '{name}': available methods are {', '.join(available_methods())}") from None


from qcompiler.quantize.methods.base import Method  # noqa: E402  (re-exported)
from qcompiler.quantize.result import QuantizationResult  # noqa: E402  (re-exported)

__all__ = ["Method", "QuantizationResult", "available_methods", "get_method", "register_method"]
