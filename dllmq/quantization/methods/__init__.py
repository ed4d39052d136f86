"""Quantization methods by CLI name. Each is a `Method` subclass (see base.py) registered with
`@register_method`; importing this package imports the built-in ones. A new method is its math module in
dllmq/quantization plus one adapter class here (and a transform class registered with `@register_transform` in
runtime/transforms.py, only if it brings a new kind of online transform)."""

from __future__ import annotations

from ...errors import UserError
# importing the adapters registers the built-in methods, in this order (the CLI lists them so)
from . import rtn  # noqa: F401, I001
from . import gptq  # noqa: F401
from . import awq  # noqa: F401
from . import weight_act  # noqa: F401
from .base import METHODS, Method, register_method  # noqa: F401


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; supported: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def label_of(name: str) -> str:
    """The method's display name (model cards), or the name itself for an unknown method."""
    cls = METHODS.get(name)
    return (cls.label or cls.name) if cls is not None else name
