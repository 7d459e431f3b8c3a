"""Methods that stay eager inside torch.compile'd code, marked without importing torch._dynamo.

The KV cache storages do index arithmetic and in-place writes that compiled blocks must not
specialise on (one graph break per layer instead). `torch.compiler.disable` imports
torch._dynamo (~0.6 s) when it is applied, so as an import-time decorator every command paid for
it, `--help` included. `@eager_method` only records the method; `apply_eager_methods()` (called by
`core.optimize` before anything is compiled) wraps every recorded one, and methods of classes
defined after that are wrapped at once.
"""

from __future__ import annotations

from collections.abc import Callable

_MARKED: list[tuple[type, str]] = []
_applied = False


def _disable(fn: Callable) -> Callable:
    import torch

    wrapped = torch.compiler.disable(fn)
    wrapped.__eager_method__ = True
    return wrapped


class eager_method:  # noqa: N801 - used as a decorator
    """Decorator: this method runs eagerly (a graph break) when called from compiled code."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __set_name__(self, owner: type, name: str) -> None:
        _MARKED.append((owner, name))
        setattr(owner, name, _disable(self.fn) if _applied else self.fn)


def apply_eager_methods() -> None:
    """Wrap every marked method in `torch.compiler.disable` (idempotent)."""
    global _applied
    _applied = True
    for owner, name in _MARKED:
        method = owner.__dict__[name]
        if not getattr(method, "__eager_method__", False):
            setattr(owner, name, _disable(method))
