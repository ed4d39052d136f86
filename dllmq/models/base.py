"""What every supported dLLM family provides, and the model interface the rest of dllmq uses.

A family module (llada.py, dream.py, ...) defines an `ArchSpec`: how to read its config.json,
how to build its module tree under the published tensor names, and the structural facts that
quantization algorithms need (blocks, linears in execution order, which norm or linear feeds
which linears, the LM head, mask token, logit alignment). Adding a family means one new module
that registers an ArchSpec; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import attention_bias, positions_from_mask, rope_tables


@dataclass(frozen=True)
class Feed:
    """`source` (a norm or linear inside the block) produces the input of every linear in `targets`.

    kind="norm": an RMSNorm weight can absorb per-channel scales of the targets' inputs.
    kind="linear": the source linear's output rows can absorb them (e.g. v_proj -> attn_out,
    valid only when the channels map one to one, i.e. no GQA repeat; up_proj -> down proj).
    """

    source: str
    targets: tuple[str, ...]
    kind: str  # "norm" | "linear"


# Upper bounds on config.json sizes (well above any published model: LLaMA-405B has hidden 16384, 126 layers,
# 128 heads, intermediate 53248; the largest vocabularies are ~256k): anything beyond is a typo or an attack.
SIZE_LIMITS = {"hidden_size": 1 << 17, "num_layers": 1 << 12, "num_heads": 1 << 12, "num_kv_heads": 1 << 12,
               "intermediate_size": 1 << 20, "vocab_size": 1 << 24}
# the config.json key behind each DLLMConfig field, per family (for error messages)
CONFIG_FIELDS = {
    "llada": {"hidden_size": "d_model", "num_layers": "n_layers", "num_heads": "n_heads", "num_kv_heads": "n_kv_heads",
              "intermediate_size": "mlp_hidden_size", "vocab_size": "embedding_size"},
    "dream": {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads"},
    "llama": {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads"},
}


@dataclass(frozen=True)
class DLLMConfig:
    """Normalised view of a family's config.json (the raw dict is kept to write back unchanged)."""

    family: str
    raw: dict
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # rows of the embedding / LM head (LLaDA's embedding_size)
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    mask_token_id: int
    eos_token_id: int | None
    pad_token_id: int | None
    extra_stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # sizes come from a user's config.json: refuse a wrong type, a non-positive or an absurd value here,
        # before any module is built or memory allocated (a vocab of 1e12 would try to allocate terabytes)
        from ..errors import UserError

        names = CONFIG_FIELDS.get(self.family, {})
        for attr, limit in SIZE_LIMITS.items():
            v = getattr(self, attr)
            key = names.get(attr, attr)
            if isinstance(v, bool) or not isinstance(v, int):
                shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
                raise UserError(f"config.json: {key} must be a whole number, got {shown}; fix config.json or "
                                "re-download the model")
            if not 0 < v <= limit:
                raise UserError(f"config.json: {key} = {v} is {'not positive' if v <= 0 else 'absurdly large'} "
                                f"(expected 1..{limit}); fix config.json or re-download the model")
        if self.hidden_size % self.num_heads:
            raise UserError(f"config.json: {names.get('num_heads', 'num_heads')} = {self.num_heads} does not divide "
                            f"{names.get('hidden_size', 'hidden_size')} = {self.hidden_size}; fix config.json")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"config.json: {names.get('num_kv_heads', 'num_kv_heads')} = {self.num_kv_heads} does "
                            f"not divide {names.get('num_heads', 'num_heads')} = {self.num_heads}; fix config.json")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def staged_forward(block: nn.Module, x: torch.Tensor, rope, bias) -> torch.Tensor:
    """A transformer block's forward, written as `block.N_STAGES` stages over a small state dict.

    Stage k begins where the k-th sequential group of the block's linears (pipeline.sequential_groups) reads its
    input and runs up to where the next group reads its own. The block's forward is these stages in a row; the
    pipeline runs them one at a time and keeps the state in between, so sequential GPTQ (each group calibrated on
    the outputs of the already quantized groups before it) costs one forward per block instead of one per group.
    """
    s = {"x": x}
    for k in range(block.N_STAGES):
        s = block.stage(k, s, rope, bias)
    return s["x"]


class PreNormSwiGLUBlock(nn.Module):
    """A pre-norm transformer block, x + o(SDPA(q, k, v of norm(x))), then + down(silu(gate(m)) * up(m)) with
    m = norm(x), computed in the four stages of `staged_forward` (one per sequential group: q/k/v, o, gate/up, down).
    A family's block builds its modules under their published names and says which plays which part in `parts()`:
    (attn_norm, q, k, v, core, o, ffn_norm, gate, up, down)."""

    N_STAGES = 4

    def parts(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def stage(self, k: int, s: dict, rope, bias) -> dict:
        attn_norm, q, k_, v, core, o, ffn_norm, gate, up, down = self.parts()
        if k == 0:
            n = attn_norm(s["x"])
            return {"x": s["x"], "a": core(q(n), k_(n), v(n), rope, bias)}
        if k == 1:
            x = s["x"] + o(s["a"])
            return {"x": x, "m": ffn_norm(x)}
        if k == 2:
            return {"x": s["x"], "g": F.silu(gate(s["m"])) * up(s["m"])}
        return {"x": s["x"] + down(s["g"])}

    def forward(self, x: torch.Tensor, rope, bias) -> torch.Tensor:
        return staged_forward(self, x, rope, bias)


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    parse_config: Callable[[dict], DLLMConfig]
    build: Callable[[DLLMConfig], "DiffusionLM"]
    blocks_path: str  # dotted path of the ModuleList of transformer blocks
    block_linears: tuple[str, ...]  # names inside a block, in execution order
    feeds: tuple[Feed, ...]
    embed_name: str
    final_norm_name: str
    head_name: str  # LM head module name (full path): excluded from quantization by default
    logits_shifted: bool  # True: logits[:, i] predicts token i+1 (Dream); False: token i (LLaDA)
    mlp_down: str  # the FFN down projection (massive activation outliers sit at its input)
    attn_out: str  # the attention output projection (its input is softmax·V)
    attn_core: str  # AttentionCore submodule inside a block
    description: str = ""
    notes: dict = field(default_factory=dict)

    def default_ignore(self) -> list[str]:
        """Regexes (re.fullmatch on full module names) left in full precision by default."""
        return [self.head_name.replace(".", r"\.")]


class DiffusionLM(nn.Module):
    """Common interface over the native family implementations.

    forward() returns the family's raw logits; `aligned_logits()` returns logits where position i
    predicts token i for every family (Dream's AR-style shift undone), which is what the samplers,
    the likelihood and calibration consume.
    """

    arch: ArchSpec
    config: DLLMConfig

    # -- family hooks -------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def final_norm(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.arch.blocks_path)  # type: ignore[return-value]

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    # -- forward pieces (the block-by-block pipeline calls them one at a time) ------------
    def block_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Per-forward inputs shared by all blocks: rotary tables and the attention key mask."""
        pos = positions_from_mask(input_ids, attention_mask)
        cos, sin = rope_tables(pos, self.config.head_dim, self.config.rope_theta)
        return {"rope": (cos, sin), "bias": attention_bias(attention_mask)}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.final_norm()(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.block_context(input_ids, attention_mask)
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, **ctx)
        return self.head(h)

    def window_logits(self, input_ids: torch.Tensor, start: int, end: int,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Aligned logits of positions [start, end) from a forward over that window only.

        Keys and values of the other positions must come from a KV cache (dllmq.diffusion.cache); rotary
        tables and the padding key mask are built for the whole sequence, so positions stay absolute.
        """
        ws = start - 1 if self.arch.logits_shifted else start  # shifted logits: position i is predicted at i-1
        ws = max(ws, 0)
        ctx = self.block_context(input_ids, attention_mask)
        cos, sin = ctx["rope"]
        ctx["rope"] = (cos[:, :, ws:end], sin[:, :, ws:end])
        h = self.embed(input_ids[:, ws:end])
        for block in self.blocks:
            h = block(h, **ctx)
        logits = self.head(h)
        if self.arch.logits_shifted:
            return logits[:, :-1] if start > 0 else torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def aligned_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self(input_ids, attention_mask)
        if self.arch.logits_shifted:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def generate(self, prompt, gen_length: int = 64, steps: int = 64, block_length: int = 32,
                 temperature: float = 0.0, cache: str | None = None, threshold: float | None = None, **kw):
        """Text in, text out with the model's own tokenizer and chat template: a prompt -> str, a list of
        prompts -> list[str]. `cache`/`threshold` (or fast=True) decode fast; more in dllmq.textgen.generate_text
        (chat, remasking, alg, seed, batch_size, tokenizer)."""
        from ..textgen import generate_text

        return generate_text(self, prompt, gen_length=gen_length, steps=steps, block_length=block_length,
                             temperature=temperature, cache=cache, threshold=threshold, **kw)

    def linear_names(self) -> list[str]:
        """Full names of the block linears, in execution order, block by block."""
        return [f"{self.arch.blocks_path}.{i}.{n}" for i in range(len(self.blocks)) for n in self.arch.block_linears]
