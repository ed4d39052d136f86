"""AWQ: activation-aware per-channel scales folded into the preceding norm or linear (as the
architecture registry's feeds say), a weight-clipping search, then RTN or GPTQ rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..awq import apply_clip, awq_search_clip, awq_search_scales, fold_scales
from ..qweight import QuantizedWeight
from .base import BlockContext, GPTQRoundingOptions, Method, one_of, positive_int, option, register_method


@dataclass(frozen=True)
class AWQOptions(GPTQRoundingOptions):
    grid: int = option(20, positive_int)  # llm-awq's n_grid
    duo_scaling: bool = True
    clip: bool = True
    w_quantizer: str = option("rtn", one_of(("rtn", "gptq")))
    max_tokens: int = option(4096, positive_int)


@register_method
class AWQ(Method):
    """Options: grid (20), duo_scaling (True), clip (True), w_quantizer ('rtn' | 'gptq'), max_tokens (4096:
    rows for the scale and clip searches; the mean |x| uses every token), and with GPTQ rounding damp,
    act_order, cgq (+ its settings)."""

    name = "awq"
    label = "AWQ"
    needs_calibration = True
    default_weight_symmetric = False  # llm-awq: zero_point=True, g128 (QDLM Appendix A)
    Options = AWQOptions

    def __init__(self, qcfg, **options):
        super().__init__(qcfg, **options)
        self._clip: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, torch.Tensor] = {}

    def transform_block(self, block, ctx: BlockContext) -> dict:
        o = self.opts
        spec = self.qcfg.weights
        max_tokens = o.max_tokens
        info = {}
        for feed in ctx.arch.feeds:
            if feed.kind == "linear":
                prev = block.get_submodule(feed.source)
                nxt = block.get_submodule(feed.targets[0])
                if prev.weight.shape[0] != nxt.weight.shape[1]:
                    continue  # GQA v_proj -> o_proj: channels do not map one to one
            st = ctx.channel_stats([feed.targets[0]], rows=max_tokens).get(feed.targets[0])
            if st is None or st["rows"].numel() == 0:
                continue
            lins = [block.get_submodule(t) for t in feed.targets]
            X, x_mean = st["rows"], st["absmean"]  # rows for the search; mean |x| over every token, as llm-awq
            scales, sinfo = awq_search_scales(x_mean, [l.weight.detach().float() for l in lins], spec, X=X,
                                              grid=o.grid, duo_scaling=o.duo_scaling)
            fold_scales(block.get_submodule(feed.source), lins, scales.to(lins[0].weight.device))
            info[feed.source] = sinfo.get("best_ratio")
        if o.clip or o.w_quantizer == "rtn":
            names = list(ctx.arch.block_linears)
            X = ctx.capture_inputs(names, min(max_tokens, 1024))
            for n in names:
                full = ctx.prefix + n
                if o.clip and X[n].numel():
                    self._clip[full] = awq_search_clip(block.get_submodule(n).weight.detach().float(), X[n], spec,
                                                       grid=o.grid)
        self.last_ratios = info  # chosen AWQ ratio per feed, for inspection
        return {}

    def quantize_linear(self, name: str, weight: torch.Tensor, stats=None) -> QuantizedWeight:
        w = weight.float()
        clip = self._clip.pop(name, None)
        if clip is not None:  # AWQ's own per-group clip search, applied before rounding
            w = apply_clip(w, clip, self.qcfg.weights)
        return self.round_weight(name, w, stats)
