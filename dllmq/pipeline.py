"""The quantization pipeline: model folder -> quantized dllmq checkpoint.

It walks the model block by block, reading each block's tensors from the safetensors shards
(never the whole model at once), lets the method quantize every targeted linear, and streams
the packed tensors into an atomic CheckpointWriter. Tensors outside the blocks (embeddings,
final norm, LM head) are copied unchanged.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.format import QuantizationConfig
from .checkpoint.writer import CheckpointWriter, check_target
from .errors import UserError
from .models.loading import ShardReader, parse, read_config, resolve_model_path
from .quantization.methods import get_method
from .quantization.qweight import QuantizedWeight
from .checkpoint.serialize import packed_tensors
from .ui import progress


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rel_error: float  # ||W - W_hat||_F / ||W||_F (weight error; calibrated methods add output error)
    seconds: float
    extra: dict = field(default_factory=dict)


@dataclass
class QuantizeResult:
    out: Path
    layers: list[LayerReport]
    seconds: float
    source: Path


def compile_ignore(patterns: list[str]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise UserError(f"--ignore pattern {p!r} is not a valid regular expression ({e})") from None
    return out


def quantize(
    model: str | Path | None,
    qcfg: QuantizationConfig,
    out: str | Path,
    overwrite: bool = False,
    device: str = "cpu",
    revision: str | None = None,
    command: str | None = None,
    method_options: dict | None = None,
    show_progress: bool = True,
) -> QuantizeResult:
    t_start = time.time()
    out = Path(out)
    check_target(out, overwrite)  # fail fast, before reading gigabytes
    src = resolve_model_path(model, revision)
    raw = read_config(src)
    if "quantization_config" in raw:
        raise UserError(f"{src} is already quantized; quantize the full-precision model instead")
    arch, config = parse(src)
    reader = ShardReader(src)
    method = get_method(qcfg.method)(qcfg, **(method_options or {}))
    if method.needs_calibration:
        raise UserError(f"method {qcfg.method!r} needs calibration, which this pipeline does not run yet")
    ignore = compile_ignore(qcfg.ignore)

    # Decide the targets and validate shapes before writing anything.
    targets: list[str] = []
    for i in range(config.num_layers):
        for lin in arch.block_linears:
            name = f"{arch.blocks_path}.{i}.{lin}"
            if any(p.fullmatch(name) for p in ignore):
                continue
            if f"{name}.weight" not in reader:
                raise UserError(f"tensor {name}.weight is missing from {src}; the checkpoint is incomplete")
            targets.append(name)
    shapes = {}
    for name in targets:
        shape = _shape(reader, f"{name}.weight")
        qcfg.weights.check_layer(name, shape[1])
        shapes[name] = shape
    qcfg.quantized_layers = targets
    target_set = set(targets)

    reports: list[LayerReport] = []
    writer = CheckpointWriter(out, overwrite)
    with writer, progress(show_progress) as prog:
        per_block = len(arch.block_linears)
        task = prog.add_task("quantize", total=len(targets), info="") if prog else None
        block_prefix = arch.blocks_path + "."
        # non-block tensors: embeddings, final norm, LM head
        writer.add({n: reader.get(n) for n in reader.map if not n.startswith(block_prefix)})
        for i in range(config.num_layers):
            prefix = f"{block_prefix}{i}."
            names = reader.names(prefix)
            tensors = {}
            for n in names:
                layer = n.rsplit(".", 1)[0]
                if layer in target_set and n.endswith(".weight"):
                    t0 = time.time()
                    w = reader.get(n).to(device=device, dtype=torch.float32)
                    qw = method.quantize_linear(layer, w)
                    err = _rel_error(w, qw)
                    tensors.update({f"{layer}.{k}": v for k, v in packed_tensors(qw).items()})
                    reports.append(LayerReport(layer, tuple(w.shape), err, time.time() - t0))
                    if prog:
                        prog.update(task, advance=1, info=f"block {i + 1}/{config.num_layers}")
                elif layer in target_set and n.endswith(".bias"):
                    tensors[n] = reader.get(n)
                else:
                    tensors[n] = reader.get(n)
            writer.add(tensors)
        raw_out = dict(raw)
        raw_out["quantization_config"] = qcfg.to_dict()
        manifest = {
            "base_model": str(model) if model else "tiny",
            "base_model_path": str(src),
            "revision": revision,
            "command": command or " ".join(sys.argv),
            "method": qcfg.method,
            "calibration": None,
            "layers": [r.__dict__ for r in reports],
        }
        writer.finalize(raw_out, src, manifest)
    return QuantizeResult(out, reports, time.time() - t_start, src)


def _shape(reader: ShardReader, name: str) -> tuple[int, ...]:
    h = reader._handle(reader.map[name])
    return tuple(h.get_slice(name).get_shape())


def _rel_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    wh = qw.dequantize(torch.float32)
    return float((w - wh).norm() / w.norm().clamp(min=1e-12))
