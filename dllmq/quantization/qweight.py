"""The result of quantizing one linear weight, before it is packed for a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import dequantize
from .spec import WeightSpec


@dataclass
class QuantizedWeight:
    """Integer codes plus the parameters that map them back to real numbers.

    ``w_hat = (q - zero_point) * scale`` with ``scale`` / ``zero_point`` of shape [N, G]
    ([N, 1] per channel, [1, 1] per tensor) broadcast over the ``K / G`` inputs of a group.
    Codes are kept unpacked (int32) here because the algorithms that produce them (RTN,
    GPTQ, AWQ) and the tests want plain tensors; packing happens at export / module build.
    """

    q: torch.Tensor  # int32 [N, K], signed, in [spec.qmin, spec.qmax]
    scale: torch.Tensor  # float32 [N, G]
    zero_point: torch.Tensor | None  # int32 [N, G]; None when symmetric
    spec: WeightSpec

    def __post_init__(self) -> None:
        if self.q.dim() != 2 or self.scale.dim() != 2:
            raise ValueError(f"q and scale must be 2-D, got {tuple(self.q.shape)} and {tuple(self.scale.shape)}")
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError(
                f"zero_point shape {tuple(self.zero_point.shape)} != scale shape {tuple(self.scale.shape)}"
            )

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero_point, self.spec, dtype=dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        zp = None if self.zero_point is None else self.zero_point.to(device)
        return QuantizedWeight(self.q.to(device), self.scale.to(device), zp, self.spec)
