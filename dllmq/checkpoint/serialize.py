"""QuantizedWeight <-> the tensors stored for one linear (names in checkpoint/format.py)."""

from __future__ import annotations

import torch

from ..quantization.qweight import QuantizedWeight
from ..quantization.spec import WeightSpec
from .packing import pack_cols, pack_rows, unpack_cols, unpack_rows


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


def unpack_tensors(t: dict[str, torch.Tensor], spec: WeightSpec) -> QuantizedWeight:
    N, K = (int(x) for x in t["weight_shape"].tolist())
    bits = spec.num_bits
    packed = t["weight_packed"]
    q = packed.to(torch.int32) if bits == 8 else unpack_rows(packed, bits, K)
    zp = None
    if "weight_zero_point" in t:
        z = t["weight_zero_point"]
        zp = z.to(torch.int32) if bits == 8 else unpack_cols(z, bits, N)
    return QuantizedWeight(q=q, scale=t["weight_scale"].float(), zero_point=zp, spec=spec)
