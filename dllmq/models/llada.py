"""Native LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5): an OLMo-style bidirectional transformer.

Module names mirror the published checkpoint exactly (model.transformer.blocks.{i}.q_proj, ...),
so the shards load without renaming. Note that `ff_out` is both the per-block down projection and
the LM head (model.transformer.ff_out): always match on full names.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import ArchSpec, DiffusionLM, DLLMConfig, Feed, PreNormSwiGLUBlock
from .layers import AttentionCore, RMSNorm

LLADA_MASK_ID = 126336


def parse_config(raw: dict) -> DLLMConfig:
    for key in ("d_model", "n_layers", "n_heads"):
        if key not in raw:
            raise UserError(f"config.json of a LLaDA model lacks the field {key!r}; is this a LLaDA checkpoint?")
    if raw.get("block_type", "llama") != "llama":
        raise UserError(f"LLaDA block_type {raw.get('block_type')!r} is not supported (only 'llama', as in LLaDA-8B)")
    if raw.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise UserError(f"LLaDA activation_type {raw.get('activation_type')!r} is not supported (only 'silu')")
    d = raw["d_model"]
    mlp = raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d
    bias = bool(raw.get("include_bias", False))
    return DLLMConfig(
        family="llada",
        raw=raw,
        hidden_size=d,
        num_layers=raw["n_layers"],
        num_heads=raw["n_heads"],
        num_kv_heads=raw.get("n_kv_heads") or raw["n_heads"],
        intermediate_size=mlp,
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(raw.get("weight_tying", False)),
        qkv_bias=bias or bool(raw.get("include_qkv_bias", False)),
        mlp_bias=bias,
        mask_token_id=int(raw.get("mask_token_id", LLADA_MASK_ID)),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        extra_stop_ids=tuple(x for x in [raw.get("eot_token_id")] if x is not None),
    )


class LLaDABlock(PreNormSwiGLUBlock):
    """Pre-norm block: x + attn_out(SDPA(q,k,v)), then + ff_out(silu(ff_proj(m)) * up_proj(m))."""

    def __init__(self, c: DLLMConfig):
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        bias_ln = bool(c.raw.get("bias_for_layer_norm", False))
        self.attn_norm = RMSNorm(d, c.rms_norm_eps, bias_ln)
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=c.mlp_bias)
        self.ff_norm = RMSNorm(d, c.rms_norm_eps, bias_ln)
        self.ff_proj = nn.Linear(d, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=c.mlp_bias)
        self.ff_out = nn.Linear(c.intermediate_size, d, bias=c.mlp_bias)
        self.sdpa = AttentionCore(c.num_heads, c.num_kv_heads, hd)

    def parts(self) -> tuple:
        return (self.attn_norm, self.q_proj, self.k_proj, self.v_proj, self.sdpa, self.attn_out, self.ff_norm,
                self.ff_proj, self.up_proj, self.ff_out)


class _LLaDAModel(nn.Module):
    def __init__(self, c: DLLMConfig):
        super().__init__()
        t = nn.ModuleDict()
        t["wte"] = nn.Embedding(c.vocab_size, c.hidden_size)
        t["blocks"] = nn.ModuleList(LLaDABlock(c) for _ in range(c.num_layers))
        t["ln_f"] = RMSNorm(c.hidden_size, c.rms_norm_eps, bool(c.raw.get("bias_for_layer_norm", False)))
        if not c.tie_word_embeddings:
            t["ff_out"] = nn.Linear(c.hidden_size, c.vocab_size, bias=bool(c.raw.get("include_bias", False)))
        self.transformer = t


class LLaDAModelLM(DiffusionLM):
    def __init__(self, c: DLLMConfig):
        super().__init__()
        self.arch = LLADA
        self.config = c
        self.model = _LLaDAModel(c)

    def embed(self, input_ids):
        return self.model.transformer["wte"](input_ids)

    def final_norm(self):
        return self.model.transformer["ln_f"]

    def unembed(self, hidden):
        t = self.model.transformer
        if self.config.tie_word_embeddings:
            return F.linear(hidden, t["wte"].weight)
        return t["ff_out"](hidden)


LLADA = ArchSpec(
    family="llada",
    model_types=("llada",),
    parse_config=parse_config,
    build=LLaDAModelLM,
    blocks_path="model.transformer.blocks",
    block_linears=("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"),
    feeds=(
        Feed("attn_norm", ("q_proj", "k_proj", "v_proj"), "norm"),
        Feed("v_proj", ("attn_out",), "linear"),
        Feed("ff_norm", ("ff_proj", "up_proj"), "norm"),
        Feed("up_proj", ("ff_out",), "linear"),
    ),
    embed_name="model.transformer.wte",
    final_norm_name="model.transformer.ln_f",
    head_name="model.transformer.ff_out",
    logits_shifted=False,
    mlp_down="ff_out",
    attn_out="attn_out",
    attn_core="sdpa",
    description="LLaDA-8B-Base / -Instruct / LLaDA-1.5 (model_type 'llada')",
)
