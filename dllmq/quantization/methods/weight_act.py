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
- IA-AQ (DLLMQuant, `ia_aq=True`): V is quantized (per token and head, asymmetric min-max as the
  paper's ŝ = (V_max − V_min)/(Q_max − Q_min)) and its clip ratio α is searched over 1.0, 0.98, ..,
  0.8 to minimise ‖P·V − P·Q(V; α)‖_F², P = softmax(QKᵀ/√d) of the block's own q/k on calibration
  inputs, so tokens that receive more attention weigh more. Open points and our choices: the grid
  step (0.02); V's bits when --kv-bits is 16 (the activation bits); P is not quantized (dllmq keeps
  attention in floating point). α and V's bits are stored per layer ({"v_clip", "v_bits"} on the
  attention output projection's transform entry) and used by the runtime's value quantizer
  (dllmq.runtime.kv_quant).

Class defaults (see Method): activations asymmetric per token for SmoothQuant and DuQuant (their
reference code, DuQuant's per-token quantizer), symmetric for QuaRot (a_asym=False); K/V quantized at
the activation bits when activations are quantized; QuaRot also rotates q/k by a head-dim Hadamard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import UserError
from ..awq import fold_scales
from ..qweight import QuantizedWeight
from ..smoothquant import fold_qk_scales, qk_smooth_scales, smooth_scales
from .base import BlockContext, GPTQRoundingOptions, Method, in_range, one_of, option, positive_int, register_method


_STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WeightActOptions(GPTQRoundingOptions):
    w_quantizer: str = option("rtn", one_of(("rtn", "gptq")))
    w_clip: float = option(1.0, in_range(0.0, 1.0, lo_open=True))  # weight clip ratio (DuQuant's --swc)
    ia_aq: bool = False  # DLLMQuant's IA-AQ value quantization


@dataclass(frozen=True)
class SmoothQuantOptions(WeightActOptions):
    alpha: float = option(0.5, in_range(0.0, 1.0))  # migration strength


@dataclass(frozen=True)
class QuaRotOptions(WeightActOptions):
    w_quantizer: str = option("gptq", one_of(("rtn", "gptq")))  # QuaRot + GPTQ is the strong combination
    seed: int = 0  # of the random Hadamard's signs


@dataclass(frozen=True)
class DuQuantOptions(WeightActOptions):
    # --swc 0.8, --alpha 0.5, --block_size 128, --max_rotation_step 256; RTN rounding (--epochs 0, no LWC)
    w_clip: float = option(0.8, in_range(0.0, 1.0, lo_open=True))
    alpha: float = option(0.5, in_range(0.0, 1.0))
    block: int = option(128, positive_int)
    steps: int = option(256, positive_int)
    max_rows: int = option(256, positive_int)  # calibration rows the rotations are fitted on
    store_dtype: str = option("bfloat16", one_of(tuple(_STORE_DTYPES)))


class _WeightAct(Method):
    needs_calibration = True
    quantizes_activations = True
    default_group_size = None  # QDLM §4.1: per-channel weights, per-token activations
    Options = WeightActOptions
    kv_follows_activations = True  # QuaRot's --k_bits/--v_bits = a_bits scripts; DuQuant's QuantMatMul at abits

    def quantize_linear(self, name: str, weight: torch.Tensor, stats=None) -> QuantizedWeight:
        return self.round_weight(name, weight.float(), stats, clip_ratio=float(self.opts.w_clip))

    # -- shared pieces --------------------------------------------------------------------
    def _smooth_qk(self, block, ctx: BlockContext) -> None:
        """With K quantized, smooth between queries and keys first (the DuQuant/SmoothQuant reference code's
        qkt smoothing): key outlier channels move into the queries, which stay in floating point."""
        if not self.qcfg.kv_cache.enabled:
            return
        qkv = next(f for f in ctx.arch.feeds if f.kind == "norm" and len(f.targets) == 3)
        q_name, k_name = qkv.targets[0], qkv.targets[1]
        X = ctx.capture_inputs([q_name], 4096)[q_name]
        if X.numel() == 0:
            return
        q_proj, k_proj = block.get_submodule(q_name), block.get_submodule(k_name)
        dev = q_proj.weight.device
        X = X.to(dev, torch.float32)
        q = torch.nn.functional.linear(X, q_proj.weight.float(), None if q_proj.bias is None else q_proj.bias.float())
        k = torch.nn.functional.linear(X, k_proj.weight.float(), None if k_proj.bias is None else k_proj.bias.float())
        s = qk_smooth_scales(q, k, ctx.config.head_dim, alpha=float(self.opts.alpha))
        fold_qk_scales(q_proj, k_proj, s)

    def _ia_aq(self, block, ctx: BlockContext, online: dict) -> None:
        """DLLMQuant's IA-AQ: quantize V and choose its clip ratio α ∈ IA_AQ_GRID (1.0 .. 0.8) to minimise
        ‖P·V − P·Q(V; α)‖_F² over the calibration batches (`dllmq.runtime.kv_quant.search_value_clip`).

        Call at the end of `transform_block`, once the block's weights (q/k/v included) are final: P and V
        come from the block as it will run. V's bits: --kv-bits when K/V are quantized, else the activation
        bits (`ia_aq_value_bits`). Records ``{"v_clip": α, "v_bits": b}`` on the attention output
        projection's entry of `online` (so it lands in quantization_config.transforms) and installs the K/V
        quantizers with that α on this block, so later passes see V quantized as at run time.
        """
        if not self.opts.ia_aq or not self.qcfg.activations.enabled:
            return
        from ...runtime.kv_quant import ia_aq_value_bits, install_kv_quant, search_value_clip

        arch, kv = ctx.arch, self.qcfg.kv_cache
        bits = ia_aq_value_bits(kv, self.qcfg.activations)
        install_kv_quant(block, arch, kv, rotate_qk=kv.rotate_qk)  # P from the keys the runtime will see
        core = block.get_submodule(arch.attn_core)
        # Any capture that reaches the attention core drives the batches through it; channel_stats keeps no
        # rows, and the capture's StopBlock skips the rest of the block.
        meter = search_value_clip(core, lambda: ctx.channel_stats([arch.attn_core]), kv.act_spec(num_bits=bits))
        if meter.tokens == 0:
            return
        entry = {"v_clip": meter.best(), "v_bits": bits}
        spec, tens = online.get(arch.attn_out, ({}, {}))
        online[arch.attn_out] = ({**spec, **entry}, tens)
        install_kv_quant(block, arch, kv, rotate_qk=kv.rotate_qk, transforms={arch.attn_out: entry})


@register_method
class SmoothQuant(_WeightAct):
    """Options: alpha (0.5), w_quantizer ('rtn' | 'gptq'), ia_aq."""

    name = "smoothquant"
    label = "SmoothQuant"
    default_act_symmetric = False  # DuQuant's code (QDLM's SmoothQuant): asymmetric per-token
    default_weight_symmetric = False  # ... and asymmetric per-channel weights (no --symmetric in QDLM's scripts)
    Options = SmoothQuantOptions

    def transform_block(self, block, ctx: BlockContext) -> dict:
        alpha = float(self.opts.alpha)
        online: dict = {}
        self._smooth_qk(block, ctx)
        for feed in ctx.arch.feeds:
            # max|x| over every calibration token, through the transforms of the earlier feeds
            st = ctx.channel_stats([feed.targets[0]]).get(feed.targets[0])
            if st is None or not st["tokens"]:
                continue
            lins = [block.get_submodule(t) for t in feed.targets]
            s = smooth_scales(st["absmax"], [l.weight.detach().float() for l in lins], alpha=alpha)
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
                    ctx.install(t, *online[t])  # before the next feed's statistics
        self._ia_aq(block, ctx, online)
        return online


@register_method
class QuaRot(_WeightAct):
    """Options: seed (0), w_quantizer ('rtn' | 'gptq': QuaRot + GPTQ is the strong combination), ia_aq."""

    name = "quarot"
    label = "QuaRot"
    default_act_symmetric = True  # QuaRot: a_asym=False
    # QuaRot's fake_quant defaults: symmetric per-channel weights (w_asym=False, w_groupsize=-1) rounded
    # by GPTQ (w_rtn=False) with the weight-clip search (--w_clip = our MSE scale search)
    default_scale_search = "mse"
    Options = QuaRotOptions
    rotates_qk = True  # online head-dim Hadamard on q and k after RoPE (QKRotationWrapper)

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
        rotate_outer(emb, head, norm, cfg, seed=self.opts.seed)

    def transform_block(self, block, ctx: BlockContext) -> dict:
        from ..quarot import rotate_block

        local = rotate_block(block, ctx.arch, ctx.config, seed=self.opts.seed)
        online = {k: ({kk: vv for kk, vv in v.items() if kk != "location"}, {}) for k, v in local.items()}
        for k, v in online.items():
            ctx.install(k, *v)
        self._ia_aq(block, ctx, online)
        return online


@register_method
class DuQuant(_WeightAct):
    """Options: alpha (0.5), block (128), steps (256), max_rows (256: calibration rows the rotations are fitted
    on), store_dtype ('bfloat16': rotations stored in it, weights folded against the stored values),
    w_clip (0.8), w_quantizer, ia_aq."""

    name = "duquant"
    label = "DuQuant"
    default_act_symmetric = False  # DuQuant: asymmetric per-token dynamic activations
    default_weight_symmetric = False  # asymmetric per-channel weights (DuQuant main.py without --symmetric)
    default_act_clip = 0.9  # --lac 0.9

    # The clips (--lac 0.9 --swc 0.8) are the papers' 4-bit setting. At 8 bits a 20 % weight clip removes
    # more than rounding saves: on the bundled model W8A8 moved the masked-token NLL by -0.019 with it and
    # +0.004 without (docs/methods.md), so 8-bit weights / activations are not clipped by default.
    @classmethod
    def act_clip_for(cls, act_bits: int) -> float:
        return cls.default_act_clip if act_bits <= 4 else 1.0

    @classmethod
    def defaults_for(cls, weight_bits: int | None) -> dict:
        d = dict(cls.OPTIONS)
        if weight_bits is not None and weight_bits > 4:
            d["w_clip"] = 1.0
        return d

    Options = DuQuantOptions

    def transform_block(self, block, ctx: BlockContext) -> dict:
        from ..duquant import duquant_transform

        o = self.opts
        online: dict = {}
        groups = [list(f.targets) for f in ctx.arch.feeds]
        covered = {t for g in groups for t in g}
        groups += [[n] for n in ctx.arch.block_linears if n not in covered]
        store = _STORE_DTYPES[o.store_dtype]
        self._smooth_qk(block, ctx)
        for group in groups:
            # rows for fitting the rotations, smoothing from max|x| over every token; both through the
            # transforms of the earlier groups (installed below as soon as each is folded)
            st = ctx.channel_stats([group[0]], rows=8192).get(group[0])
            if st is None or st["rows"].numel() == 0:
                continue
            X, absmax = st["rows"], st["absmax"]
            lins = [block.get_submodule(t) for t in group]
            t = duquant_transform(X, [l.weight.detach().float() for l in lins], block=o.block, steps=o.steps,
                                  alpha=float(o.alpha), max_rows=o.max_rows, seed=ctx.index, act_absmax=absmax)
            t = t.rounded(store)  # the stored (rounded) rotations are what the weights are folded against
            for name, lin in zip(group, lins):
                lin.weight.copy_(t.fold_into(lin.weight.detach().double()).to(lin.weight.dtype))
            # one transform per shared input: stored with the first reader, the others point to it
            online[group[0]] = ({"type": "duquant"}, t.to_tensors(store))
            ctx.install(group[0], *online[group[0]])
            for name in group[1:]:
                online[name] = ({"type": "duquant", "shared_with": ctx.prefix + group[0]}, {})
                ctx.install(name, *online[name])
        self._ia_aq(block, ctx, online)
        return online
