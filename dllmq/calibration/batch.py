"""One calibration batch: the inputs every method's statistics are taken on (its own module so that the block
stream and the calibration-set builders can share it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CalibBatch:
    ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor | None  # [B, L] or None
    masked: torch.Tensor  # bool [B, L]
    confidence: torch.Tensor | None = None  # [B, L], full-precision model confidence
    valid: torch.Tensor | None = None  # bool [B, L]: True = real token, False = padding; None = all real
