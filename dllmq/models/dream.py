"""Native Dream (Dream-org/Dream-v0-Base-7B / -Instruct-7B): the Qwen2 layout, bidirectional.

Dream keeps the autoregressive convention for its logits (position i predicts token i+1); the
spec says so and `DiffusionLM.aligned_logits` shifts them back for samplers and likelihoods.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import ArchSpec, DiffusionLM, DLLMConfig, Feed, PreNormSwiGLUBlock
from .layers import AttentionCore, RMSNorm

DREAM_MASK_ID = 151666


def parse_config(raw: dict) -> DLLMConfig:
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in raw:
            raise UserError(f"config.json of a Dream model lacks the field {key!r}; is this a Dream checkpoint?")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"Dream hidden_act {raw.get('hidden_act')!r} is not supported (only 'silu')")
    return DLLMConfig(
        family="dream",
        raw=raw,
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        vocab_size=raw["vocab_size"],
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True,
        mlp_bias=False,
        mask_token_id=int(raw.get("mask_token_id", DREAM_MASK_ID)),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )


class DreamAttention(nn.Module):
    """Qwen2-layout attention. q/k/v biases follow `c.qkv_bias` (always True for Dream);
    `o_bias` and `causal` exist for the AR `llama` family, which reuses these modules."""

    def __init__(self, c: DLLMConfig, o_bias: bool = False, causal: bool = False):
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=o_bias)
        self.sdpa = AttentionCore(c.num_heads, c.num_kv_heads, hd, is_causal=causal)

    def forward(self, x, rope, bias):
        return self.o_proj(self.sdpa(self.q_proj(x), self.k_proj(x), self.v_proj(x), rope, bias))


class DreamMLP(nn.Module):
    def __init__(self, c: DLLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(PreNormSwiGLUBlock):
    def __init__(self, c: DLLMConfig, o_bias: bool = False, causal: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DreamAttention(c, o_bias=o_bias, causal=causal)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DreamMLP(c)

    def parts(self) -> tuple:  # the staged forward computes what DreamAttention and DreamMLP compute
        at, mlp = self.self_attn, self.mlp
        return (self.input_layernorm, at.q_proj, at.k_proj, at.v_proj, at.sdpa, at.o_proj,
                self.post_attention_layernorm, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


class _DreamBaseModel(nn.Module):
    def __init__(self, c: DLLMConfig, o_bias: bool = False, causal: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(c, o_bias, causal) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DreamModel(DiffusionLM):
    """`arch`, `o_bias`, `causal`: overridden only by families sharing the layout (llama.py)."""

    def __init__(self, c: DLLMConfig, arch: ArchSpec | None = None, o_bias: bool = False, causal: bool = False):
        super().__init__()
        self.arch = arch or DREAM
        self.config = c
        self.model = _DreamBaseModel(c, o_bias, causal)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def final_norm(self):
        return self.model.norm

    def unembed(self, hidden):
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)


DREAM = ArchSpec(
    family="dream",
    model_types=("Dream", "dream"),
    parse_config=parse_config,
    build=DreamModel,
    blocks_path="model.layers",
    block_linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    feeds=(
        Feed("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
        Feed("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
        Feed("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
        Feed("mlp.up_proj", ("mlp.down_proj",), "linear"),
    ),
    embed_name="model.embed_tokens",
    final_norm_name="model.norm",
    head_name="lm_head",
    logits_shifted=True,
    mlp_down="mlp.down_proj",
    attn_out="self_attn.o_proj",
    attn_core="self_attn.sdpa",
    description="Dream-v0-Base-7B / -Instruct-7B (model_type 'Dream', Qwen2 layout)",
    notes={"gqa": "v_proj -> o_proj scale folding needs the kv-head repeat; transforms must respect it"},
)
