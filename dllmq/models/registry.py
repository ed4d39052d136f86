"""The architecture registry: model_type in config.json -> ArchSpec."""

from __future__ import annotations

from ..errors import UserError
from .base import ArchSpec
from .dream import DREAM
from .llada import LLADA
from .llama import LLAMA  # plain AR LLaMA layout, for side-by-side benchmarks

_FAMILIES: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for mt in spec.model_types:
        _FAMILIES[mt] = spec
    return spec


for _spec in (LLADA, DREAM, LLAMA):
    register(_spec)


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def arch_for(raw_config: dict) -> ArchSpec:
    mt = raw_config.get("model_type")
    if mt not in _FAMILIES:
        raise UserError(
            f"unsupported model_type {mt!r} in config.json; supported: {', '.join(supported_model_types())}"
        )
    return _FAMILIES[mt]
