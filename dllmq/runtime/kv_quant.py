"""K/V quantization at run time, QuaRot's online q/k Hadamard, and IA-AQ's search of V's clip.

What the references do, and what this module does:

* QuaRot (spcl/QuaRot, fake_quant): K is quantized after RoPE, behind an online Hadamard over
  head_dim applied to both q and k (``QKRotationWrapper``; it cancels in QKᵀ); V is quantized at
  the v projection's output (after the offline per-head Hadamard of ``rotate_ov_proj``), in
  asymmetric groups of head_dim. Queries stay in 16 bits.
* DuQuant / SmoothQuant (Hsu1023/DuQuant, used by QDLM for both): Q, K and V are quantized at the
  activation bits by ``QuantMatMul`` with the per-token asymmetric activation quantizer, applied
  to per-head tensors [B, H, L, d], i.e. per token and head; P stays in 16 bits.
* ours: K and V (not Q, not P) are quantized per token and head (one row = head_dim values; the
  same granularity as QuaRot's head_dim groups and DuQuant's per-token quantizer on per-head
  tensors), dynamically, with the arithmetic of the activations
  (`quantization.grid.quantize_per_token_affine`: asymmetric by default, as all three references), then
  dequantized: attention itself runs in floating point SDPA, which is what the references
  simulate as well (their fake-quant matmuls dequantize before a floating-point matmul).

The quantizers sit in `AttentionCore`'s slots (`qk_rotate`, `key_quant`, `value_quant`), before
the ``--fast`` block cache, so the cache stores quantized keys/values.

IA-AQ (DLLMQuant §IA-AQ; see `search_value_clip`): V's clip ratio α is chosen per layer on
calibration inputs to minimise ‖P·V − P·Q(V; α)‖_F², P = softmax(QKᵀ/√d) from the block's own
q/k (after RoPE, the q/k rotation and K quantization, as at run time), summed over all heads,
tokens and calibration batches. The chosen α and V's bits are recorded on the attention output
projection's entry of ``quantization_config.transforms`` as ``{"v_clip": α, "v_bits": b}``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..quantization.spec import ActSpec, KVCacheSpec

# IA-AQ's candidate clip ratios for V: 1.0 down to 0.8 in steps of 0.02. The survey's rebuilt
# equation reads "α ∈ {1.0, ..., 0.8}"; the step is not given, 0.02 is our choice (11 candidates).
IA_AQ_GRID: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))


class KVQuantizer(nn.Module):
    """Quantize-dequantize of per-head keys or values [B, H, L, d]: one row per token and head."""

    def __init__(self, spec: ActSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..quantization.grid import fake_quant_act

        return fake_quant_act(x, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        return f"int{s.num_bits} {'sym' if s.symmetric else 'asym'} per-token-head, clip={s.clip_ratio:g}"


class HeadDimHadamard(nn.Module):
    """QuaRot's online Hadamard over head_dim, applied to q and k after RoPE (cancels in QKᵀ)."""

    def __init__(self, head_dim: int):
        super().__init__()
        from ..quantization.hadamard import hadamard_factor

        hadamard_factor(head_dim)  # ValueError for sizes without a Hadamard matrix
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..quantization.hadamard import fast_hadamard_transform

        return fast_hadamard_transform(x)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"


def default_kv_spec(method_cls, act_bits: int, kv_bits: int | None = None) -> KVCacheSpec:
    """The K/V spec of `dllmq quantize`: ``kv_bits`` if given, else the method's paper protocol
    (`Method.default_kv_bits`); QuaRot's q/k Hadamard only when keys are quantized (as in QuaRot,
    where the wrapper exists only for k_bits < 16)."""
    bits = method_cls.default_kv_bits(act_bits) if kv_bits is None else int(kv_bits)
    spec = KVCacheSpec(num_bits=bits)
    return KVCacheSpec(num_bits=bits, rotate_qk=bool(getattr(method_cls, "rotates_qk", False)) and spec.enabled)


def ia_aq_value_bits(kv: KVCacheSpec, act: ActSpec) -> int:
    """Bits of V under IA-AQ: the K/V bits when K/V are quantized, otherwise the activation bits
    (IA-AQ is a quantizer of V: with --kv-bits 16 it still quantizes V, at the activation bits,
    as DLLMQuant's W4A4 quantizes the softmax·V matmul's operand at the activation bits)."""
    return kv.num_bits if kv.enabled else act.num_bits


def value_spec(kv: KVCacheSpec, entry: dict | None = None) -> ActSpec:
    """V's quantizer: the K/V spec, or IA-AQ's per-layer bits and clip when `entry` has "v_clip"."""
    if entry and "v_clip" in entry:
        return kv.act_spec(num_bits=int(entry.get("v_bits", kv.num_bits)), clip_ratio=float(entry["v_clip"]))
    return kv.act_spec()


def _blocks_with_prefixes(model_or_block: nn.Module, arch, prefix: str) -> list[tuple[nn.Module, str]]:
    blocks = getattr(model_or_block, "blocks", None) if hasattr(model_or_block, "arch") else None
    if isinstance(blocks, nn.ModuleList):
        return [(b, f"{arch.blocks_path}.{i}.") for i, b in enumerate(blocks)]
    return [(model_or_block, prefix)]


def install_kv_quant(model_or_block: nn.Module, arch, kv_spec: KVCacheSpec, rotate_qk: bool,
                     transforms: dict | None = None, prefix: str = "") -> int:
    """Put K/V quantization (and, with `rotate_qk`, QuaRot's q/k Hadamard) into the attention
    core(s) of a whole model or of one block; returns the number of cores set.

    `transforms` is ``quantization_config.transforms`` (full layer names) or a method's online dict
    (local names, with ``prefix=""``): an IA-AQ entry ``{"v_clip", "v_bits"}`` on the block's
    attention output projection overrides V's clip and bits. `prefix` is the block's full name
    prefix ("model.transformer.blocks.3.") when a single block is given. Slots left without
    quantization are reset to identity, so calling it again replaces what was there; a 16-bit
    spec without rotation and without IA-AQ entries restores the exact float model.
    """
    n = 0
    for blk, pre in _blocks_with_prefixes(model_or_block, arch, prefix):
        core = blk.get_submodule(arch.attn_core)
        entry = (transforms or {}).get(pre + arch.attn_out)
        vspec = value_spec(kv_spec, entry)
        device = next((t.device for t in blk.parameters()), None)
        core.qk_rotate = HeadDimHadamard(core.head_dim) if rotate_qk else nn.Identity()
        core.key_quant = KVQuantizer(kv_spec.act_spec()) if kv_spec.enabled else nn.Identity()
        core.value_quant = KVQuantizer(vspec) if vspec.enabled else nn.Identity()
        if device is not None:
            core.to(device)
        n += 1
    return n


# --------------------------------------------------------------------------- IA-AQ


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d) in fp32, with SDPA's boolean key mask (True = may attend) [B, 1, 1, L]."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        lq, lk = s.shape[-2], s.shape[-1]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if bias is not None:
        s = s.masked_fill(~bias.to(s.device), float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num_(0.0)


class PVErrorMeter:
    """Forward pre-hook for an AttentionCore: accumulates ‖P·V − P·Q(V; α)‖_F² for every α.

    P comes from the core's own q/k (RoPE, q/k rotation and key quantization as installed), V is
    taken before `value_quant`. Heads are processed `head_chunk` at a time, so memory holds one
    [B, chunk, L, L] block of P; P is computed once per chunk and reused for every α. Query rows at
    padding positions (False in the key mask) do not count.
    """

    def __init__(self, core: nn.Module, spec: ActSpec, grid: tuple[float, ...] = IA_AQ_GRID, head_chunk: int = 4):
        from dataclasses import replace

        self.core = core
        self.specs = [replace(spec, clip_ratio=a) for a in grid]
        self.grid = grid
        self.head_chunk = head_chunk
        self.err = torch.zeros(len(grid), dtype=torch.float64)
        self.ref = 0.0  # ‖P·V‖² (for relative errors)
        self.tokens = 0

    @torch.no_grad()
    def __call__(self, module, args) -> None:
        from ..quantization.grid import fake_quant_act

        q, k, v, rope, bias = args[:5]
        qh, kh, vh = self.core.heads(q, k, v, rope, quantize_values=False)
        rep = qh.shape[1] // kh.shape[1]
        vf = vh.float()
        errs = [vf - fake_quant_act(vf, s) for s in self.specs]  # V − Q(V; α), [B, Hkv, L, d]
        rows = None if bias is None else bias[:, 0, 0, :].to(qh.device)  # [B, L] real query positions
        for h0 in range(0, qh.shape[1], self.head_chunk):
            h1 = min(h0 + self.head_chunk, qh.shape[1])
            kv_idx = torch.arange(h0, h1, device=qh.device) // rep
            p = attention_probs(qh[:, h0:h1], kh[:, kv_idx], bias, getattr(self.core, "is_causal", False))
            if rows is not None:
                p = p * rows[:, None, :, None]
            self.ref += float(torch.matmul(p, vf[:, kv_idx]).pow(2).sum())
            for i, e in enumerate(errs):
                self.err[i] += float(torch.matmul(p, e[:, kv_idx]).pow(2).sum())
        self.tokens += int(qh.shape[0] * qh.shape[2] if rows is None else rows.sum())

    def best(self) -> float:
        """The α with the smallest accumulated error; ties go to the larger α (less clipping)."""
        return float(self.grid[int(torch.argmin(self.err))])  # argmin returns the first minimum


def search_value_clip(core: nn.Module, run: Callable[[], object], spec: ActSpec,
                      grid: tuple[float, ...] = IA_AQ_GRID) -> PVErrorMeter:
    """Hook `core`, call `run()` (which must drive the calibration batches through the block at
    least up to the attention core), unhook; returns the meter (`.best()`, `.err`, `.ref`)."""
    meter = PVErrorMeter(core, spec, grid)
    h = core.register_forward_pre_hook(meter)
    try:
        run()
    finally:
        h.remove()
    return meter
