"""Byte-level BPE tokenizer with LLaDA's special tokens and chat template.

* Model: byte-level BPE trained with the ``tokenizers`` library; no normaliser,
  so decoding reproduces the input exactly (indentation, tabs, newlines, any
  Unicode).
* Pre-tokenisation: ``Digits(individual_digits=True)`` then ``ByteLevel`` (GPT-2
  regex, no prefix space): every digit is its own token, which makes
  arithmetic learnable for a tiny model.
* Special tokens (ids 0-5, in this order), named as in LLaDA:
  ``<|startoftext|>`` (bos), ``<|endoftext|>`` (eos and pad), ``<|mdm_mask|>``
  (mask), ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``.
* Nothing is added automatically when encoding (``add_bos_token: false``); the
  chat template (LLaDA-8B-Instruct's, verbatim) writes the bos token itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "MASK_TOKEN",
    "START_HEADER_TOKEN",
    "END_HEADER_TOKEN",
    "EOT_TOKEN",
    "SPECIAL_TOKENS",
    "LLADA_CHAT_TEMPLATE",
    "train_tokenizer",
    "load_tokenizer",
    "special_token_ids",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN
MASK_TOKEN = "<|mdm_mask|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"

#: In id order: the trained tokenizer gives these ids 0..5.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN)

#: LLaDA-8B-Instruct's chat template, verbatim.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)


def _build_backend(vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the special tokens of a (loaded or trained) tokenizer.

    Keys: bos_token_id, eos_token_id, pad_token_id, mask_token_id,
    start_header_id, end_header_id, eot_id.
    """
    conv = tokenizer.convert_tokens_to_ids
    return {
        "bos_token_id": int(conv(BOS_TOKEN)),
        "eos_token_id": int(conv(EOS_TOKEN)),
        "pad_token_id": int(conv(PAD_TOKEN)),
        "mask_token_id": int(conv(MASK_TOKEN)),
        "start_header_id": int(conv(START_HEADER_TOKEN)),
        "end_header_id": int(conv(END_HEADER_TOKEN)),
        "eot_id": int(conv(EOT_TOKEN)),
    }


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> dict[str, int]:
    """Train the tokenizer on ``texts`` and save it to ``out_dir``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (and, with recent
    transformers, ``chat_template.jinja``) via
    ``PreTrainedTokenizerFast.save_pretrained``; reload with
    ``PreTrainedTokenizerFast.from_pretrained(out_dir)`` or ``AutoTokenizer``.
    Returns :func:`special_token_ids` of the saved tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError("vocab_size must leave room for the 256 byte tokens and the specials")
    backend, trainer = _build_backend(vocab_size, min_frequency)
    backend.train_from_iterator((t for t in texts if t), trainer=trainer)
    for i, tok in enumerate(SPECIAL_TOKENS):  # pinned ids, whatever the trainer did
        if backend.token_to_id(tok) != i:
            raise RuntimeError(f"special token {tok} got id {backend.token_to_id(tok)}, expected {i}")

    kwargs = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = int(model_max_length)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN],
        chat_template=LLADA_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
        **kwargs,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))

    # Make the config explicit and loadable by transformers 4.x and 5.x alike.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        chat_template=LLADA_CHAT_TEMPLATE,
    )
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return special_token_ids(load_tokenizer(out))


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer saved by :func:`train_tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))
