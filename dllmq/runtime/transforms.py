"""Online input transforms: what a weight-activation method must apply to a linear's input at
inference (after folding the inverse into the weight offline).

Recorded in `quantization_config.transforms[<layer>]` as a small dict; tensors (if any) are
stored in the shards as `<layer>.input_transform.<name>`:
  {"type": "hadamard", "size": n}          x -> x @ H_n^T / sqrt(n)           (QuaRot, FFN down input)
  {"type": "duquant"}                       x -> (x / s) @ R1 P R2             (DuQuant; tensors smooth_scale,
                                                                                 rot1, perm, rot2)
  {"type": "scale"}                         x -> x / s                         (SmoothQuant where no fold is
                                                                                 possible; tensor smooth_scale)
A transform dict may also carry {"act_clip": r}: the activation clipping ratio chosen for that
layer's input (IA-AQ for the attention output projection).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

TENSOR_PREFIX = "input_transform"


class OnlineHadamard(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        from ..quantization.hadamard import hadamard_factor

        hadamard_factor(size)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..quantization.hadamard import fast_hadamard_transform

        return fast_hadamard_transform(x)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class OnlineDuQuant(nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for k in ("rot1", "perm", "rot2"):
            if k not in tensors:
                raise UserError(f"DuQuant transform tensor {k!r} is missing from the checkpoint")
        self.register_buffer("rot1", tensors["rot1"])
        self.register_buffer("perm", tensors["perm"].long())
        self.register_buffer("rot2", tensors["rot2"])
        self.register_buffer("smooth_scale", tensors.get("smooth_scale"))

    def transform(self):
        from ..quantization.duquant import DuQuantTransform

        return DuQuantTransform(self.smooth_scale, self.rot1, self.perm, self.rot2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform().apply(x)


class OnlineScale(nn.Module):
    def __init__(self, smooth_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("smooth_scale", smooth_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / self.smooth_scale.float()).to(x.dtype)


def build(spec: dict, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
    kind = spec.get("type")
    if kind is None:
        return None
    if kind == "hadamard":
        return OnlineHadamard(int(spec["size"]))
    if kind == "duquant":
        return OnlineDuQuant(tensors)
    if kind == "scale":
        return OnlineScale(tensors["smooth_scale"])
    raise UserError(f"unknown online transform {kind!r} in the checkpoint; upgrade dllmq")


def tensor_names(layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{layer}.{TENSOR_PREFIX}.{k}": v for k, v in tensors.items()}


def install(module: nn.Module, transform: nn.Module) -> None:
    """Apply `transform` to a plain nn.Linear's input (QuantLinear has its own slot)."""
    from .qlinear import QuantLinear

    if isinstance(module, QuantLinear):
        module.input_transform = transform
        return
    module.add_module("input_transform", transform)
    module.register_forward_pre_hook(lambda m, args: (m.input_transform(args[0]),) + tuple(args[1:]))
