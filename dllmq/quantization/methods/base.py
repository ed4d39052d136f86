"""The interface every quantization method implements.

The pipeline walks the model block by block. For each block it
  1. lets the method transform the block in place (`transform_block`: smoothing, scale folding,
     rotations; function-preserving in full precision), with a `BlockContext` that can replay the
     calibration batches through the block and return the inputs of chosen linears;
  2. creates per-layer statistics (`new_stats`, e.g. a GPTQ Hessian accumulator) and feeds them the
     inputs of each linear (groups of linears that share an input are quantized one after another,
     later groups seeing the already-quantized earlier ones);
  3. calls `quantize_linear` for every targeted linear.
The algorithms themselves are pure tensor functions in dllmq.quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ...checkpoint.format import QuantizationConfig
from ..qweight import QuantizedWeight


@dataclass
class BlockContext:
    index: int
    prefix: str  # full name prefix of the block, e.g. "model.transformer.blocks.3."
    arch: object
    config: object
    capture_inputs: Callable[[list[str], int], dict[str, torch.Tensor]]  # local linear names -> X [T, K]


class Method:
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # False when transform_block never touches the weights: the pipeline then quantizes the weights
    # as stored on disk, even when the block runs in a lower-precision calibration dtype.
    rewrites_weights: ClassVar[bool] = True
    quantizes_activations: ClassVar[bool] = False
    # How weight scales are chosen unless option scale_search says otherwise (rtn.SCALE_SEARCHES).
    default_scale_search: ClassVar[str] = "minmax"

    def __init__(self, qcfg: QuantizationConfig, **options):
        self.qcfg = qcfg
        self.options = options

    @property
    def scale_search(self) -> str:
        return str(self.options.get("scale_search", self.default_scale_search))

    @property
    def wants_confidence(self) -> bool:
        """True when statistics need the full-precision model's per-token confidence (CGQ)."""
        return False

    def check(self, arch, config) -> None:
        """Raise UserError before any work if the method cannot handle this model."""

    def transform_nonblock(self, tensors: dict, arch, config) -> None:
        """Rewrite (in place) the tensors outside the blocks: embeddings, final norm, LM head."""

    def transform_block(self, block: nn.Module, ctx: BlockContext) -> dict:
        """Rewrite the block in place, function-preserving once the returned online transforms are
        applied: {linear name inside the block: (spec dict, tensors dict)} (see runtime/transforms.py)."""
        return {}

    def new_stats(self, name: str):
        """An object with .add(x [T, K], token_weights [T] | None), or None if no statistics are needed."""
        return None

    def quantize_linear(self, name: str, weight: torch.Tensor, stats=None) -> QuantizedWeight:
        raise NotImplementedError
