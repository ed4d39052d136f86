"""Building blocks shared by the native dLLM implementations.

RMSNorm and RoPE run in fp32 whatever the model dtype, as LLaDA (`rope_full_precision`) and
Qwen2/Dream do; attention is bidirectional SDPA (no causal mask) for every diffusion family.
`AttentionCore(..., is_causal=True)` adds the autoregressive mask, for plain AR checkpoints
(the `llama` family) that dllmq quantizes for side-by-side comparisons with AR tools.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the affine weight."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(dtype)
        if self.bias is not None:
            out = out + self.bias
        return out


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, L, head_dim] in fp32 for (NeoX-style, rotate-half) rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, D]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def attention_bias(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean key mask [B, 1, 1, L] for SDPA (True = may attend); None means attend everywhere."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def positions_from_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Position ids [B, L]; with left padding, real tokens count from 0 (as Dream's sampler does). Without a mask every
    row has the same positions: [1, L], so the RoPE tables are computed once and broadcast over the batch."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


class AttentionCore(nn.Module):
    """Multi-head SDPA with RoPE and GQA; holds no weights. Bidirectional unless `is_causal`.

    The projections live on the family's block under their published names; this module only
    turns projected q/k/v into the per-head softmax(QK^T)V product. `is_causal=True`
    (autoregressive families only; the default False keeps LLaDA/Dream bidirectional) lets
    position i attend to keys <= i, combined with the padding key mask when there is one.

    Identity slots where K/V quantization plugs in (`dllmq.runtime.kv_quant.install_kv_quant`),
    all on per-head tensors [B, heads, L, head_dim]:
      * `qk_rotate`: applied to q and k after RoPE (QuaRot's online Hadamard over head_dim; it
        cancels in QKᵀ because it is orthogonal and applied to both sides);
      * `key_quant`: applied to k after RoPE and `qk_rotate`;
      * `value_quant`: applied to v (the v projection's output, split into heads);
      * `value_out`: applied to the softmax(QKᵀ)V product before the heads are merged.
    K and V are quantized BEFORE the `--fast` block cache (`self.kv_cache.update`) stores or
    splices them, so cached positions hold the same quantized keys/values a full forward would
    compute, and freshly computed window positions are quantized the same way: the quantizers are
    per token (and head), so splicing rows never changes another row's scale.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, is_causal: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.is_causal = is_causal
        self.value_out: nn.Module = nn.Identity()
        self.qk_rotate: nn.Module = nn.Identity()
        self.key_quant: nn.Module = nn.Identity()
        self.value_quant: nn.Module = nn.Identity()
        # Set by dllmq.diffusion.cache while a cached sampler runs: stores this layer's keys/values on a
        # full forward and splices the window's fresh keys/values into them on a window forward.
        self.kv_cache = None

    def heads(self, q, k, v, rope, quantize_values: bool = True):
        """Projected q/k/v [B, L, heads * head_dim] -> per-head q, k, v [B, heads, L, head_dim] as
        attention consumes them: RoPE, `qk_rotate`, `key_quant`, and `value_quant` unless
        `quantize_values` is False (IA-AQ's calibration needs the unquantized values)."""
        B, L, _ = q.shape
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = self.qk_rotate(q), self.qk_rotate(k)
        k = self.key_quant(k)
        if quantize_values:
            v = self.value_quant(v)
        return q, k, v

    def forward(self, q, k, v, rope, bias) -> torch.Tensor:
        B, L, _ = q.shape
        q, k, v = self.heads(q, k, v, rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(self, k, v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        causal = False
        if self.is_causal:
            if bias is None:
                causal = True  # SDPA's own lower-triangular mask
            else:  # SDPA takes one or the other: fold the causal mask into the key mask
                tri = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
                eye = torch.eye(L, dtype=torch.bool, device=q.device)
                bias = (bias & tri) | eye  # a padding query sees itself: no all-masked row (NaN)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
        # (with a cache, q covers the window and k/v the whole sequence; bias masks keys, so it still applies)
        return self.value_out(out).transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
