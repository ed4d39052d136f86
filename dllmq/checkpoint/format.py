"""Checkpoint format v1: names and the `quantization_config` block (see docs/format.md).

Per quantized linear `<name>` the shards hold, as in compressed-tensors' pack-quantized format:
  <name>.weight_packed      int32 [N, ceil(K*bits/32)] (8-bit: int8 [N, K])
  <name>.weight_scale       float [N, G]
  <name>.weight_zero_point  int32 [ceil(N*bits/32), G]  (asymmetric only; 8-bit: int8 [N, G])
  <name>.weight_shape       int64 [2] = (N, K)
  <name>.bias               (if the layer has one, unchanged)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..quantization.spec import ActSpec, KVCacheSpec, WeightSpec

FORMAT_NAME = "dllmq-packed"
FORMAT_VERSION = 1
MANIFEST = "dllmq_manifest.json"
QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


@dataclass
class QuantizationConfig:
    method: str
    weights: WeightSpec
    activations: ActSpec = field(default_factory=ActSpec)
    ignore: list[str] = field(default_factory=list)
    quantized_layers: list[str] = field(default_factory=list)
    method_args: dict = field(default_factory=dict)
    transforms: dict = field(default_factory=dict)  # online transforms (rotations, smoothing) by layer
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)  # K/V quantization (16 bits = none)

    def to_dict(self) -> dict:
        return {
            "quant_method": "dllmq",
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "weights": self.weights.to_dict(),
            "input_activations": self.activations.to_dict(),
            "ignore": self.ignore,
            "quantized_layers": self.quantized_layers,
            "method_args": self.method_args,
            "transforms": self.transforms,
            "kv_cache": self.kv_cache.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizationConfig":
        if d.get("format") != FORMAT_NAME:
            raise UserError(f"quantization format {d.get('format')!r} is not dllmq's; "
                            "dllmq loads checkpoints it wrote (format 'dllmq-packed')")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(f"checkpoint format version {d['format_version']} is newer than this dllmq "
                            f"understands ({FORMAT_VERSION}); upgrade dllmq")
        return cls(
            method=d["method"],
            weights=WeightSpec.from_dict(d["weights"]),
            activations=ActSpec.from_dict(d.get("input_activations")),
            ignore=list(d.get("ignore", [])),
            quantized_layers=list(d.get("quantized_layers", [])),
            method_args=dict(d.get("method_args", {})),
            transforms=dict(d.get("transforms", {})),
            kv_cache=KVCacheSpec.from_dict(d.get("kv_cache")),  # absent in older checkpoints: 16 bits
        )
