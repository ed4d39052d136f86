"""GPTQ (optionally with DLLMQuant's CGQ token weighting of the Hessian): the shared rounder (base.Method.round_weight)
in its GPTQ mode, with the Hessian statistics it collects."""

from __future__ import annotations

from .base import GPTQRoundingOptions, Method, register_method


@register_method
class GPTQ(Method):
    """Options: damp (0.01), act_order (False; static groups keep scales aligned),
    cgq (False), cgq_masked (1.0) / cgq_visible (0.7): the indicator values for masked / visible
    tokens, cgq_conf_power (0.5: the square root of confidence), scale_search ('mse': each group's
    clipping searched, see rtn.mse_qparams; 'minmax': the plain range)."""

    name = "gptq"
    label = "GPTQ"
    needs_calibration = True
    rewrites_weights = False
    default_scale_search = "mse"
    Options = GPTQRoundingOptions

    @property
    def rounds_with_gptq(self) -> bool:
        return True
