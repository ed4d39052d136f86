"""Round-to-nearest, no calibration: min-max scales per group/channel/tensor (option scale_search='mse'
searches each group's clipping instead)."""

from __future__ import annotations

import torch

from ..qweight import QuantizedWeight
from ..rtn import rtn_quantize
from .base import Method


class RTN(Method):
    rewrites_weights = False
    name = "rtn"

    def quantize_linear(self, name: str, weight: torch.Tensor, stats: dict | None = None) -> QuantizedWeight:
        return rtn_quantize(weight.float(), self.qcfg.weights,
                            scale_search=self.scale_search)
