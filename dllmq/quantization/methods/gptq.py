"""GPTQ (optionally with DLLMQuant's CGQ token weighting of the Hessian)."""

from __future__ import annotations

import torch

from ..gptq import HessianAccumulator, gptq_quantize
from ..qweight import QuantizedWeight
from .base import GPTQ_OPTIONS, Method


class GPTQ(Method):
    """Options: damp (0.01), act_order (False; static groups keep scales aligned),
    cgq (False), cgq_masked (1.0) / cgq_visible (0.7): the indicator values for masked / visible
    tokens, cgq_conf_power (0.5: the square root of confidence), scale_search ('mse': each group's
    clipping searched, see rtn.mse_qparams; 'minmax': the plain range)."""

    name = "gptq"
    needs_calibration = True
    rewrites_weights = False
    default_scale_search = "mse"
    OPTIONS = {"scale_search": None, **GPTQ_OPTIONS}

    def new_stats(self, name: str):
        return HessianAccumulator()

    def quantize_linear(self, name: str, weight: torch.Tensor, stats=None) -> QuantizedWeight:
        o = self.options
        H = stats.hessian if stats is not None and stats.n_tokens else torch.eye(weight.shape[1])
        qw, _info = gptq_quantize(weight.float(), H.to(weight.device), self.qcfg.weights,
                                  damp=float(o.get("damp", 0.01)),
                                  act_order=bool(o.get("act_order", False)), name=name,
                                  scale_search=self.scale_search)
        return qw
