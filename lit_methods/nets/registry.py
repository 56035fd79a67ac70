"""A name -> constructor registry for backbones, in the style of timm's model registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

NetConstructor = TypeVar("NetConstructor", bound=Callable[..., nn.Module])

NETS: dict[str, Callable[..., nn.Module]] = {}


def register_net(name: str) -> Callable[[NetConstructor], NetConstructor]:
    """Decorator that adds a backbone class or factory function to ``NETS`` under ``name``."""

    def add(constructor: NetConstructor) -> NetConstructor:
        if name in NETS:
            raise ValueError(f"A net named {name!r} is already registered ({NETS[name]!r}).")
        NETS[name] = constructor
        return constructor

    return add


def list_nets() -> list[str]:
    """Sorted names of all registered backbones."""
    return sorted(NETS)


def create_net(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered backbone ``name``; ``kwargs`` go to its constructor (e.g. ``num_classes``)."""
    try:
        constructor = NETS[name]
    except KeyError:
        raise ValueError(f"Unknown net {name!r}. Available nets: {', '.join(list_nets())}.") from None
    return constructor(**kwargs)
