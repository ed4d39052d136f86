"""Weight-activation methods: SmoothQuant, QuaRot and DuQuant, each followed by RTN or GPTQ rounding
of the transformed weights (`--w-quantizer`), with optional IA-AQ activation clipping at the
attention output projection. Activations are quantized per token at run time (`--a 8|4`).

What each transform does to a block (function-preserving in full precision):
- SmoothQuant: per-channel scales s = max|x|^a / max|W|^(1-a), folded into the preceding norm or
  linear where the registry says one feeds the targets one to one, otherwise applied online.
- QuaRot: norms fused, residual stream rotated by a seeded random Hadamard (embedding, readers,
  writers, LM head), per-head Hadamard on values, online Hadamard before the FFN down projection.
- DuQuant: for every input shared by a group of linears (q/k/v, o, gate/up, down): smoothing,
  block rotation (greedy on the largest channels), zigzag permutation, second block rotation;
  folded into the weights and applied online to the activations.
- IA-AQ (DLLMQuant, `ia_aq=True`): the attention output projection's input is softmax·V; its
  per-token activation clipping ratio is searched (grid 1.0 .. 0.5) to minimise the error of the
  quantized softmax·V on calibration inputs. The paper leaves open whether Q/K are also quantized
  (we do not quantize them: dllmq keeps attention scores in floating point) and the search grid
  (ours: 11 ratios); the chosen ratio is stored per layer and used by the runtime.
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ..awq import fold_scales
from ..gptq import HessianAccumulator, gptq_quantize
from ..qweight import QuantizedWeight
from ..rtn import choose_qparams, quantize
from ..smoothquant import fake_quant_act, smooth_scales
from .base import BlockContext, Method


class _WeightAct(Method):
    needs_calibration = True
    quantizes_activations = True

    @property
    def wants_confidence(self) -> bool:
        return bool(self.options.get("cgq", False))

    def token_weights(self, batch):
        from .gptq import GPTQ

        return GPTQ.token_weights(self, batch)  # same CGQ weighting as plain GPTQ

    def new_stats(self, name: str):
        return HessianAccumulator() if self.options.get("w_quantizer", "rtn") == "gptq" else None

    def quantize_linear(self, name: str, weight: torch.Tensor, stats=None) -> QuantizedWeight:
        spec = self.qcfg.weights
        w = weight.float()
        clip = float(self.options.get("w_clip", 1.0))
        if self.options.get("w_quantizer", "rtn") == "gptq" and stats is not None and stats.n_tokens:
            qw, _ = gptq_quantize(w, stats.hessian.to(w.device), spec, damp=float(self.options.get("damp", 0.01)),
                                  act_order=bool(self.options.get("act_order", False)), clip_ratio=clip, name=name,
                                  scale_search=self.scale_search)
            return qw
        scale, zp = choose_qparams(w, spec, clip, self.scale_search)
        return QuantizedWeight(quantize(w, scale, zp, spec), scale, zp, spec)

    # -- shared pieces --------------------------------------------------------------------
    def _ia_aq(self, block, ctx: BlockContext, online: dict) -> None:
        if not self.options.get("ia_aq", False) or not self.qcfg.activations.enabled:
            return
        name = ctx.arch.attn_out
        X = ctx.capture_inputs([name], 4096)[name]
        if X.numel() == 0:
            return
        best, best_err = 1.0, None
        for r in [1.0 - 0.05 * i for i in range(11)]:
            spec = type(self.qcfg.activations)(num_bits=self.qcfg.activations.num_bits,
                                               symmetric=self.qcfg.activations.symmetric, clip_ratio=r)
            err = float((X - fake_quant_act(X, spec)).pow(2).sum())
            if best_err is None or err < best_err:
                best, best_err = r, err
        spec, tens = online.get(name, ({}, {}))
        online[name] = ({**spec, "act_clip": round(best, 4)}, tens)


class SmoothQuant(_WeightAct):
    """Options: alpha (0.5), w_quantizer ('rtn' | 'gptq'), ia_aq."""

    name = "smoothquant"

    def transform_block(self, block, ctx: BlockContext) -> dict:
        alpha = float(self.options.get("alpha", 0.5))
        online: dict = {}
        for feed in ctx.arch.feeds:
            X = ctx.capture_inputs([feed.targets[0]], 8192)[feed.targets[0]]
            if X.numel() == 0:
                continue
            lins = [block.get_submodule(t) for t in feed.targets]
            s = smooth_scales(X.abs().amax(0), [l.weight.detach().float() for l in lins], alpha=alpha)
            s = s.to(lins[0].weight.device)
            prev = block.get_submodule(feed.source)
            foldable = feed.kind == "norm" or prev.weight.shape[0] == lins[0].weight.shape[1]
            if foldable:
                fold_scales(prev, lins, s)
            else:  # e.g. Dream's GQA v_proj -> o_proj: channels do not map one to one
                for lin in lins:
                    lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
                for t in feed.targets:
                    online[t] = ({"type": "scale"}, {"smooth_scale": s.float().cpu()})
        self._ia_aq(block, ctx, online)
        return online


class QuaRot(_WeightAct):
    """Options: seed (0), w_quantizer ('rtn' | 'gptq': QuaRot + GPTQ is the strong combination), ia_aq."""

    name = "quarot"

    def check(self, arch, cfg) -> None:
        from ..quarot import check_sizes

        try:
            check_sizes(arch, cfg)
        except ValueError as e:
            raise UserError(f"QuaRot cannot rotate this model: {e}") from None
        if cfg.tie_word_embeddings:
            raise UserError("QuaRot needs an untied LM head (the final norm is folded into it)")

    def transform_nonblock(self, tensors: dict, arch, cfg) -> None:
        from ..quarot import rotate_outer

        emb = tensors[f"{arch.embed_name}.weight"] = tensors[f"{arch.embed_name}.weight"].float()
        head_key = f"{arch.head_name}.weight"
        head = tensors[head_key] = tensors[head_key].float() if head_key in tensors else None
        norm = tensors[f"{arch.final_norm_name}.weight"] = tensors[f"{arch.final_norm_name}.weight"].float()
        rotate_outer(emb, head, norm, cfg, seed=int(self.options.get("seed", 0)))

    def transform_block(self, block, ctx: BlockContext) -> dict:
        from ..quarot import rotate_block

        local = rotate_block(block, ctx.arch, ctx.config, seed=int(self.options.get("seed", 0)))
        online = {k: ({"type": v["type"], "size": v["size"]}, {}) for k, v in local.items()}
        self._ia_aq(block, ctx, online)
        return online


class DuQuant(_WeightAct):
    """Options: alpha (0.5; None = no smoothing), block (128), steps (256), max_rows (256), w_quantizer, ia_aq."""

    name = "duquant"

    def transform_block(self, block, ctx: BlockContext) -> dict:
        from ..duquant import duquant_transform

        o = self.options
        online: dict = {}
        groups = [list(f.targets) for f in ctx.arch.feeds]
        covered = {t for g in groups for t in g}
        groups += [[n] for n in ctx.arch.block_linears if n not in covered]
        for group in groups:
            X = ctx.capture_inputs([group[0]], 8192)[group[0]]
            if X.numel() == 0:
                continue
            lins = [block.get_submodule(t) for t in group]
            alpha = o.get("alpha", 0.5)
            t = duquant_transform(X, [l.weight.detach().float() for l in lins], block=int(o.get("block", 128)),
                                  steps=int(o.get("steps", 256)), alpha=None if alpha is None else float(alpha),
                                  max_rows=int(o.get("max_rows", 256)), seed=ctx.index)
            for name, lin in zip(group, lins):
                lin.weight.copy_(t.fold_into(lin.weight.detach().double()).to(lin.weight.dtype))
                online[name] = ({"type": "duquant"}, t.to_tensors())
        self._ia_aq(block, ctx, online)
        return online
