"""`dllmq.load()`: rebuild a model from a dllmq checkpoint with real quantized linears.

The module tree is built on the meta device, every quantized linear is replaced by a
QuantLinear that keeps its weight packed (int32 / int8) and computes with low-bit kernels,
and the remaining tensors are read from the shards straight onto the target device.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint.format import QUANT_SUFFIXES, QuantizationConfig
from ..checkpoint.writer import verify_manifest
from ..errors import UserError
from ..models.base import DiffusionLM
from ..models.loading import ShardReader, build_empty, load_model, parse, read_config, resolve_model_path
from . import transforms as online_transforms
from .native import native_bf16
from .qlinear import QuantLinear


# Layers up to this many weights keep a dense copy by default (2 MiB in bf16).
SMALL_LAYER_WEIGHTS = 1 << 20


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 where matmuls run it natively (tensor cores, AMX / AVX512-BF16 CPUs) or on other accelerators; float32 on
    CPUs without it, where bf16 is emulated (5x slower on an AVX2 EPYC) and the integer kernels need no bf16."""
    return torch.float32 if str(device) == "cpu" and not native_bf16("cpu") else torch.bfloat16


def load(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    revision: str | None = None,
    cache_dequantized: bool | None = None,
) -> DiffusionLM:
    dtype = dtype or default_dtype(device)
    p = resolve_model_path(path, revision)
    raw = read_config(p)
    if "quantization_config" not in raw:
        return load_model(p, device=device, dtype=dtype)
    qcfg = QuantizationConfig.from_dict(raw["quantization_config"])
    manifest = verify_manifest(p) if verify else None
    arch, config = parse(p)
    model = build_empty(arch, config)
    reader = ShardReader(p)
    for name in qcfg.quantized_layers:
        tensors = {s: reader.get(f"{name}.{s}") for s in QUANT_SUFFIXES if f"{name}.{s}" in reader}
        if "weight_packed" not in tensors:
            raise UserError(f"{name}.weight_packed is missing from {p}; the checkpoint is incomplete")
        bias = reader.get(f"{name}.bias").to(dtype) if f"{name}.bias" in reader else None
        tspec = qcfg.transforms.get(name, {})
        act = qcfg.activations
        if "act_clip" in tspec and act.enabled:  # IA-AQ: clipping chosen for this layer's input
            act = replace(act, clip_ratio=float(tspec["act_clip"]))
        ql = QuantLinear.from_state(tensors, qcfg.weights, act, bias=bias, name=name)
        # None: keep a dense bf16 copy only for small layers, where it costs little memory and the dense GEMM
        # beats the int4 kernel from 16 rows on (measured 2.3-2.5x at 256 rows without it); large layers
        # (LLaDA-8B's are 16M+ weights) keep only their packed weight.
        ql.cache_dequantized = (ql.in_features * ql.out_features <= SMALL_LAYER_WEIGHTS
                                if cache_dequantized is None else cache_dequantized)
        ql.compute_dtype = dtype
        model.set_submodule(name, ql.to(device))
    def tensors_of(name: str) -> dict:
        prefix = f"{name}.{online_transforms.TENSOR_PREFIX}."
        return {k[len(prefix):]: reader.get(k) for k in reader.names(prefix)}

    online_transforms.install_all(model, qcfg.transforms, tensors_of, device=device)
    quantized = tuple(f"{n}." for n in qcfg.quantized_layers) + tuple(
        f"{n}.{online_transforms.TENSOR_PREFIX}." for n in qcfg.transforms)
    state = {}
    for name, param in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(quantized):
            continue
        t = reader.get(name)
        if t.shape != param.shape:
            raise UserError(f"tensor {name} has shape {tuple(t.shape)} but config.json implies {tuple(param.shape)}")
        state[name] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=False)
    _check_no_meta(model)
    kv = qcfg.kv_cache  # K/V quantization (and QuaRot's q/k Hadamard, IA-AQ's per-layer V clip) in the attention cores
    if kv.enabled or kv.rotate_qk or any(isinstance(t, dict) and "v_clip" in t for t in qcfg.transforms.values()):
        from .kv_quant import install_kv_quant

        install_kv_quant(model, arch, kv, rotate_qk=kv.rotate_qk, transforms=qcfg.transforms)
    model.quant_config = qcfg
    model.manifest = manifest
    model.name_or_path = str(path)
    model.source_path = p
    return model.eval()


def _check_no_meta(model: torch.nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise UserError(f"tensor {name} was not found in the checkpoint; it is incomplete")


def is_quantized_checkpoint(path: Path) -> bool:
    return "quantization_config" in read_config(path)
