"""Tiny random-weight checkpoints in exactly the published on-disk formats, for tests.

They keep the real config fields (auto_map included), the real vocabulary sizes and special-token
ids (LLaDA's mask 126336, Dream's 151666), sharded safetensors with an index, and a tokenizer
folder with the family's chat template, so every code path that touches a real LLaDA-8B or
Dream-7B folder runs on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .base import ArchSpec
from .dream import DREAM
from .llada import LLADA

LLADA_SPECIAL = {
    "<|startoftext|>": 126080,
    "<|endoftext|>": 126081,
    "<|mdm_mask|>": 126336,
    "<|start_header_id|>": 126346,
    "<|end_header_id|>": 126347,
    "<|eot_id|>": 126348,
}
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)
DREAM_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|mask|>": 151666}
DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def llada_config(**over) -> dict:
    """LLaDA-8B-Instruct's config.json fields with small sizes."""
    cfg = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
        "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
        "mlp_hidden_size": 256, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "pad_token_id": 126081, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": 126464, "weight_tying": False,
    }
    cfg.update(over)
    return cfg


def dream_config(**over) -> dict:
    """Dream-v0-Instruct-7B's config.json fields with small sizes (GQA kept)."""
    cfg = {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 256, "mask_token_id": 151666,
        "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": 151643,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.2",
        "use_cache": False, "use_sliding_window": False, "vocab_size": 152064,
    }
    cfg.update(over)
    return cfg


def _random_state(arch: ArchSpec, raw: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = arch.build(arch.parse_config(raw))
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(p.shape, generator=g)
        else:
            t = 0.05 * torch.randn(p.shape, generator=g)
        state[name] = t.to(torch.bfloat16).contiguous()
    return state


def write_sharded(state: dict[str, torch.Tensor], out: Path, shards: int = 2) -> None:
    """Split like HF does (model-0000i-of-0000n.safetensors + index)."""
    names = list(state)
    per = max(1, -(-len(names) // shards))
    weight_map, total = {}, 0
    for i in range(shards):
        chunk = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in chunk}, str(out / fname), metadata={"format": "pt"})
        for n in chunk:
            weight_map[n] = fname
            total += state[n].numel() * state[n].element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def byte_tokenizer(special: dict[str, int], template: str, bos: str | None, eos: str, pad: str, mask: str, out: Path):
    """A byte-level tokenizer (256 byte tokens) whose special tokens sit at the real model ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update(special)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad, mask_token=mask,
    )
    fast.chat_template = template
    fast.save_pretrained(str(out))
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["add_bos_token"] = False
    cfg_file.write_text(json.dumps(cfg, indent=2))


def write_tiny_llada(out: str | Path, seed: int = 0, shards: int = 2, small_vocab: int | None = None, **over) -> Path:
    """`small_vocab=N`: an N-row vocabulary (N > 262) with the special tokens right after the 256 bytes
    instead of at LLaDA's ids, so that wide test models are not dominated by a 126k-row embedding and head."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special = LLADA_SPECIAL
    if small_vocab is not None:
        if small_vocab < 256 + len(LLADA_SPECIAL):
            raise ValueError(f"small_vocab must be at least {256 + len(LLADA_SPECIAL)}")
        special = {t: 256 + i for i, t in enumerate(LLADA_SPECIAL)}
        over = {"vocab_size": small_vocab, "embedding_size": small_vocab, "mask_token_id": special["<|mdm_mask|>"],
                "eos_token_id": special["<|endoftext|>"], "pad_token_id": special["<|endoftext|>"], **over}
    raw = llada_config(**over)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    write_sharded(_random_state(LLADA, raw, seed), out, shards)
    byte_tokenizer(special, LLADA_CHAT_TEMPLATE, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>",
                   "<|mdm_mask|>", out)
    return out


def write_tiny_dream(out: str | Path, seed: int = 0, shards: int = 2, **over) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = dream_config(**over)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    write_sharded(_random_state(DREAM, raw, seed), out, shards)
    byte_tokenizer(DREAM_SPECIAL, DREAM_CHAT_TEMPLATE, None, "<|endoftext|>", "<|endoftext|>", "<|mask|>", out)
    return out
