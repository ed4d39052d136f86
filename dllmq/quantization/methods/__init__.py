"""Quantization methods by CLI name. Each is a `Method` subclass (see base.py)."""

from __future__ import annotations

from ...errors import UserError
from .base import Method
from .awq import AWQ
from .gptq import GPTQ
from .rtn import RTN
from .weight_act import DuQuant, QuaRot, SmoothQuant

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, AWQ, SmoothQuant, QuaRot, DuQuant)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; supported: {', '.join(sorted(METHODS))}")
    return METHODS[name]
