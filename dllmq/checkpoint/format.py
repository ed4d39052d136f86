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
        """Parse config.json's `quantization_config`; anything malformed (not an object, no `method`,
        non-numeric bits, a list where an object belongs) is a one-line `UserError`."""
        fix = "re-create the checkpoint with `dllmq quantize`"
        if not isinstance(d, dict):
            raise UserError(f"config.json's quantization_config must be an object, got {type(d).__name__}; {fix}")
        if d.get("format") != FORMAT_NAME:
            raise UserError(f"quantization format {d.get('format')!r} is not dllmq's; "
                            "dllmq loads checkpoints it wrote (format 'dllmq-packed')")
        try:
            version = int(d.get("format_version", 0))
        except (TypeError, ValueError):
            raise UserError(f"config.json's quantization_config has a non-numeric format_version "
                            f"{d.get('format_version')!r}; {fix}") from None
        if version > FORMAT_VERSION:
            raise UserError(f"checkpoint format version {d['format_version']} is newer than this dllmq "
                            f"understands ({FORMAT_VERSION}); upgrade dllmq")
        method = d.get("method")
        if not isinstance(method, str) or not method:
            what = "has no 'method'" if "method" not in d else f"has method {method!r}, not a method name"
            raise UserError(f"config.json's quantization_config {what}; {fix}")
        for key in ("weights", "input_activations", "kv_cache", "method_args", "transforms"):
            v = d.get(key)
            if (key == "weights" or v is not None) and not isinstance(v, dict):
                raise UserError(f"config.json's quantization_config needs {key!r} as an object, got "
                                f"{type(v).__name__ if key in d else 'nothing'}; {fix}")
        for key in ("ignore", "quantized_layers"):
            v = d.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise UserError(f"config.json's quantization_config needs {key!r} as a list of names; {fix}")
        for key, sub in (("weights", ("num_bits", "group_size")), ("input_activations", ("num_bits", "clip_ratio")),
                         ("kv_cache", ("num_bits", "clip_ratio"))):
            for f in sub:
                v = (d.get(key) or {}).get(f)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise UserError(f"config.json's quantization_config {key}.{f} must be a number, got {v!r}; {fix}")
        if d["weights"].get("num_bits") is None:
            raise UserError(f"config.json's quantization_config weights has no 'num_bits'; {fix}")
        return cls(
            method=method,
            weights=WeightSpec.from_dict(d["weights"]),
            activations=ActSpec.from_dict(d.get("input_activations")),
            ignore=list(d.get("ignore", [])),
            quantized_layers=list(d.get("quantized_layers", [])),
            method_args=dict(d.get("method_args") or {}),
            transforms=dict(d.get("transforms") or {}),
            kv_cache=KVCacheSpec.from_dict(d.get("kv_cache")),  # absent in older checkpoints: 16 bits
        )
