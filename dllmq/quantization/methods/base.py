"""The interface every quantization method implements.

The pipeline walks the model block by block. For each block it asks the method which
statistics it needs (`needs_calibration`; later methods register hooks to accumulate e.g.
GPTQ Hessians or AWQ channel magnitudes), may let it transform the block first
(`transform_block`: smoothing, rotations; returns online transforms to store), then calls
`quantize_linear` for every linear that is not ignored. Methods are configured once with the
user's QuantizationConfig and options; the algorithms themselves are pure functions on tensors
elsewhere in dllmq.quantization.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..qweight import QuantizedWeight
from ...checkpoint.format import QuantizationConfig


class Method:
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    quantizes_activations: ClassVar[bool] = False

    def __init__(self, qcfg: QuantizationConfig, **options):
        self.qcfg = qcfg
        self.options = options

    def transform_block(self, block: nn.Module, block_index: int, stats: dict | None) -> dict:
        """Optionally rewrite the block's weights in place (function-preserving); returns
        online transforms to record in the checkpoint, keyed by layer name."""
        return {}

    def quantize_linear(self, name: str, weight: torch.Tensor, stats: dict | None = None) -> QuantizedWeight:
        raise NotImplementedError
