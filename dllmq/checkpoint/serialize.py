"""QuantizedWeight -> the tensors stored for one linear (names in checkpoint/format.py).

The reverse direction is QuantLinear.from_state(...).quantized_weight(), which also validates shapes."""

from __future__ import annotations

import torch

from ..quantization.qweight import QuantizedWeight
from .packing import pack_cols, pack_rows


def packed_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Pack along the input dim (8-bit stays int8 [N, K]); scales are stored in fp32."""
    bits = qw.spec.num_bits
    N, K = qw.q.shape
    out = {
        "weight_packed": qw.q.to(torch.int8) if bits == 8 else pack_rows(qw.q, bits),
        "weight_scale": qw.scale.float().contiguous(),
        "weight_shape": torch.tensor([N, K], dtype=torch.int64),
    }
    if qw.zero_point is not None:
        out["weight_zero_point"] = qw.zero_point.to(torch.int8) if bits == 8 else pack_cols(qw.zero_point, bits)
    return out
