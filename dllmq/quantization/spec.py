"""Quantization specs for weights and activations.

Field names follow compressed-tensors' QuantizationArgs (num_bits, symmetric, strategy,
group_size) so the checkpoint config reads like theirs and an exporter is a rename.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError

WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (4, 8, 16)  # 16 = activations stay in floating point
STRATEGIES = ("channel", "group", "tensor")


@dataclass(frozen=True)
class WeightSpec:
    """How a linear layer's weight is quantized.

    Dequantization is always ``w = (q - zero_point) * scale`` with ``q`` a signed integer in
    ``[-2^(bits-1), 2^(bits-1) - 1]``; symmetric specs have ``zero_point == 0``.
    """

    num_bits: int = 4
    symmetric: bool = True
    strategy: str = "group"  # channel | group | tensor
    group_size: int | None = 128

    def __post_init__(self) -> None:
        if self.num_bits not in WEIGHT_BITS:
            raise UserError(f"weight bits must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.num_bits}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"weight strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy == "group":
            if self.group_size is None or self.group_size < 8 or self.group_size & (self.group_size - 1):
                raise UserError(
                    f"group size must be a power of two >= 8 (e.g. 32, 64, 128), got {self.group_size}; "
                    "use --group-size -1 for one scale per output channel"
                )
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)

    @property
    def qmin(self) -> int:
        return -(1 << (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.num_bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        """Number of scale columns for a weight with `in_features` inputs."""
        if self.strategy == "group":
            return in_features // self.group_size  # type: ignore[operator]
        return 1

    def check_layer(self, name: str, in_features: int) -> None:
        if self.strategy == "group" and in_features % self.group_size:  # type: ignore[operator]
            raise UserError(
                f"group size {self.group_size} does not divide in_features={in_features} of {name}; "
                "choose a group size that divides it, or skip the layer with --ignore"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["type"] = "int"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WeightSpec":
        return cls(
            num_bits=int(d["num_bits"]),
            symmetric=bool(d.get("symmetric", True)),
            strategy=d.get("strategy", "group"),
            group_size=d.get("group_size"),
        )

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.strategy == "group" else self.strategy
        return f"int{self.num_bits} {'sym' if self.symmetric else 'asym'} {g}"


@dataclass(frozen=True)
class ActSpec:
    """How the input activations of a linear layer are quantized at run time.

    Only dynamic per-token quantization is supported: each row gets its own scale, computed
    on the fly, so nothing is calibrated or stored. ``num_bits == 16`` means no quantization.
    """

    num_bits: int = 16
    symmetric: bool = True
    strategy: str = "token"
    dynamic: bool = True
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.num_bits not in ACT_BITS:
            raise UserError(f"activation bits must be one of 4, 8 or 16 (16 = not quantized), got {self.num_bits}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise UserError(f"activation clip ratio must be in (0, 1], got {self.clip_ratio}")
        if self.strategy != "token" or not self.dynamic:
            raise UserError("only dynamic per-token activation quantization is supported")

    @property
    def enabled(self) -> bool:
        return self.num_bits < 16

    @property
    def qmin(self) -> int:
        return -(1 << (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.num_bits - 1)) - 1

    def to_dict(self) -> dict | None:
        if not self.enabled:
            return None
        d = asdict(self)
        d["type"] = "int"
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "ActSpec":
        if not d:
            return cls()
        return cls(
            num_bits=int(d["num_bits"]),
            symmetric=bool(d.get("symmetric", True)),
            clip_ratio=float(d.get("clip_ratio", 1.0)),
        )


KV_BITS = (4, 8, 16)  # 16 = keys / values stay in floating point


@dataclass(frozen=True)
class KVCacheSpec:
    """How the attention keys and values are quantized at run time (`dllmq.runtime.kv_quant`).

    Dynamic, one scale (and zero point when asymmetric) per token and head, through the same
    arithmetic as the activations (`quantization.grid.quantize_per_token_affine`); keys after RoPE (and
    after QuaRot's head-dim Hadamard when ``rotate_qk``), values at the v projection's output,
    both before the ``--fast`` block cache stores them. Attention itself (softmax(QKᵀ)V) stays
    in floating point: K and V are quantized and dequantized, which is also what the reference
    implementations (QuaRot's fake_quant, DuQuant's QuantMatMul) simulate. ``num_bits == 16``
    means no quantization; old checkpoints without the field load as 16.
    """

    num_bits: int = 16
    symmetric: bool = False
    clip_ratio: float = 1.0
    rotate_qk: bool = False  # QuaRot: online Hadamard over head_dim on q and k after RoPE

    def __post_init__(self) -> None:
        if self.num_bits not in KV_BITS:
            raise UserError(f"K/V cache bits must be one of 4, 8 or 16 (16 = not quantized), got {self.num_bits}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise UserError(f"K/V clip ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def enabled(self) -> bool:
        return self.num_bits < 16

    def act_spec(self, num_bits: int | None = None, clip_ratio: float | None = None) -> ActSpec:
        """The per-row quantizer of one key / value row (one token of one head)."""
        return ActSpec(num_bits=self.num_bits if num_bits is None else num_bits, symmetric=self.symmetric,
                       clip_ratio=self.clip_ratio if clip_ratio is None else clip_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(type="int", strategy="token_head", dynamic=True)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "KVCacheSpec":
        if not d:
            return cls()
        return cls(
            num_bits=int(d.get("num_bits", 16)),
            symmetric=bool(d.get("symmetric", False)),
            clip_ratio=float(d.get("clip_ratio", 1.0)),
            rotate_qk=bool(d.get("rotate_qk", False)),
        )
