"""Plain autoregressive LLaMA-layout checkpoints (model_type "llama"), for comparisons with AR tools.

This family is not a diffusion LM. It exists so that dllmq's quantizers can run on exactly the
model that autoregressive tools (llm-compressor, GPTQModel, ...) read, and the results can be
compared side by side (benchmarks/compare_gptq.py). It reuses Dream's Qwen2-layout modules
(same tensor names: model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm, lm_head) with:

* CAUSAL attention (`AttentionCore(is_causal=True)`), as the checkpoint was trained;
* q/k/v/o biases only when config.json says `attention_bias: true`, MLP biases with `mlp_bias`;
* AR logits (position i predicts token i+1): `logits_shifted=True`, as for Dream.

There is no mask token. `mask_token_id` is a sentinel, config.json's `mask_token_id` if present,
else `vocab_size - 1` (an ordinary vocabulary entry). Diffusion sampling, TMAS calibration,
random-mask calibration and diffusion likelihoods are therefore NOT meaningful for this family;
quantize it with clean-text calibration (`--calib-mask none`) and evaluate it as an AR model.
Supported: RMSNorm, SiLU, default (unscaled) RoPE, GQA; rope scaling variants (llama3, yarn,
linear, dynamic) and a head_dim other than hidden_size / num_attention_heads are rejected.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import UserError
from .base import DLLMConfig
from .dream import DREAM, DreamModel


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}  # transformers >= 5
    scaling = raw.get("rope_scaling") or {}  # transformers 4.x
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", None):
            raise UserError(f"llama rope type {kind!r} is not supported (only the default, unscaled RoPE)")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def parse_config(raw: dict) -> DLLMConfig:
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in raw:
            raise UserError(f"config.json of a llama model lacks the field {key!r}; is this a LLaMA checkpoint?")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"llama hidden_act {raw.get('hidden_act')!r} is not supported (only 'silu')")
    d, heads = raw["hidden_size"], raw["num_attention_heads"]
    if raw.get("head_dim") not in (None, d // heads) or d % heads:
        raise UserError(f"llama head_dim {raw.get('head_dim')} != hidden_size / num_attention_heads is not supported")
    eos = raw.get("eos_token_id")
    eos_list = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    return DLLMConfig(
        family="llama",
        raw=raw,
        hidden_size=d,
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        intermediate_size=raw["intermediate_size"],
        vocab_size=raw["vocab_size"],
        rope_theta=_rope_theta(raw),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        # no mask token exists: a sentinel (see the module docstring)
        mask_token_id=int(raw.get("mask_token_id", raw["vocab_size"] - 1)),
        eos_token_id=eos_list[0] if eos_list else None,
        pad_token_id=raw.get("pad_token_id"),
        extra_stop_ids=tuple(eos_list[1:]),
    )


class LlamaModel(DreamModel):
    """Dream's module tree with causal attention and LLaMA's optional o_proj bias."""

    def __init__(self, c: DLLMConfig):
        super().__init__(c, arch=LLAMA, o_bias=c.qkv_bias, causal=True)


LLAMA = replace(
    DREAM,
    family="llama",
    model_types=("llama",),
    parse_config=parse_config,
    build=LlamaModel,
    logits_shifted=True,
    description="plain autoregressive LLaMA layout (model_type 'llama', causal attention); for comparisons "
    "with AR quantization tools, not a diffusion LM",
    notes={
        "causal": "AR model: attention is causal; diffusion sampling / masked calibration are not meaningful",
        "mask_token_id": "sentinel (config mask_token_id or vocab_size - 1); no real mask token exists",
        "gqa": DREAM.notes.get("gqa", ""),
    },
)
