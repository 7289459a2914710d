"""The method registry: `@register_method("name")` on a `Method` subclass; `get_method(name)` → the class.

Every module of this package except `base` (the method contract) defines one method and is imported on first use of
the registry, so it registers itself: adding a method is adding a file here (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from qcompiler import QCompilerError

_REGISTRY: dict[str, type] = {}

_loaded = False


def method_modules() -> list[str]:
    """Names of the modules of this package that define methods (all but `base`), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


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
    for module in method_modules():
        importlib.import_module(f"{__name__}.{module}")


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
