"""Round-to-nearest, no calibration: min-max scales per group/channel/tensor (option scale_search='mse'
searches each group's clipping instead). The shared rounder (base.Method.round_weight) in its RTN mode."""

from __future__ import annotations

from .base import Method, register_method


@register_method
class RTN(Method):
    rewrites_weights = False
    name = "rtn"
    label = "RTN (round-to-nearest, min-max scales)"
