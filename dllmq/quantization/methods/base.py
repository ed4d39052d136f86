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
    # install(local linear name, spec, tensors): put an online input transform in place *now*, so that
    # every later capture sees the block exactly as it will run (statistics of later groups must come
    # through the transforms of earlier ones, never through folded weights without their online half).
    install: Callable[[str, dict, dict], None] = lambda name, spec, tensors: None

    def channel_stats(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Per-channel max|x| ("absmax") and mean|x| ("absmean") of the named linears' inputs over every
        calibration token (padding excluded), without keeping the rows."""
        return self.capture_inputs(names, 0, reduce=True)


class Method:
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # False when transform_block never touches the weights: the pipeline then quantizes the weights
    # as stored on disk, even when the block runs in a lower-precision calibration dtype.
    rewrites_weights: ClassVar[bool] = True
    quantizes_activations: ClassVar[bool] = False
    # How weight scales are chosen unless option scale_search says otherwise (rtn.SCALE_SEARCHES).
    default_scale_search: ClassVar[str] = "minmax"
    # The paper's activation quantizer when --a-sym/--a-asym is not given (per-token, dynamic).
    default_act_symmetric: ClassVar[bool] = True
    # True: with quantized activations the paper also quantizes K and V at the activation bits
    # (`default_kv_bits`); QuaRot additionally rotates q and k by a head-dim Hadamard (`rotates_qk`).
    kv_follows_activations: ClassVar[bool] = False
    rotates_qk: ClassVar[bool] = False

    @classmethod
    def default_kv_bits(cls, act_bits: int) -> int:
        """K/V bits when --kv-bits is not given: 16, or the activation bits where the paper's protocol
        quantizes K/V with the activations (kv_follows_activations)."""
        return act_bits if cls.kv_follows_activations and act_bits < 16 else 16

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
        applied: {linear name inside the block: (spec dict, tensors dict)} (see runtime/transforms.py).
        A transform must be passed to `ctx.install` as soon as its weights are folded, before the next
        `ctx.capture_inputs`; the pipeline installs whatever is returned and not yet installed."""
        return {}

    def new_stats(self, name: str):
        """An object with .add(x [T, K], token_weights [T] | None), or None if no statistics are needed."""
        return None

    def quantize_linear(self, name: str, weight: torch.Tensor, stats=None) -> QuantizedWeight:
        raise NotImplementedError
