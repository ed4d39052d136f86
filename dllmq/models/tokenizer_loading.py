"""A model folder's tokenizer (fast tokenizer files only, never remote code). Apart from loading.py so that code
which needs only the tokenizer (text generation on a loaded model) does not import the model loader."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from ..errors import UserError


def load_tokenizer(path: Path):
    """PreTrainedTokenizerFast from tokenizer.json + tokenizer_config.json; never runs remote code."""
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").exists():
        raise UserError(f"{path} has no tokenizer.json; dllmq needs a fast tokenizer file next to the weights")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    return tok
