"""Structural check of a dllmq checkpoint: every tensor its config.json implies is present, with the shape and
dtype the format requires (checkpoint/format.py), before a checkpoint is renamed into place, pushed or loaded.

The sha256 manifest proves that files were not changed after they were written; it cannot tell whether what
was written is loadable (a quantization_config edited and the manifest re-hashed, a block file deleted from a
partial run before --resume). This check reads only the safetensors headers (and the two values of each
`weight_shape`), so it costs milliseconds even for an 8B model: the module tree is built on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .format import QuantizationConfig
from .packing import packed_words

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
TRANSFORM_PREFIX = "input_transform"  # runtime/transforms.py TENSOR_PREFIX (checked by tests)


def read_headers(folder: Path, shards: list[str]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """tensor name -> (shape, safetensors dtype, shard file), from the headers only."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for shard in shards:
        try:
            with safe_open(folder / shard, "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()), shard)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{folder / shard} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                            "re-create the checkpoint") from None
    return out


def folder_shards(folder: Path) -> list[str]:
    """The shard files of a finished checkpoint folder (from its index, else model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(wmap.values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            raise UserError(f"{index} is corrupt; re-create or re-download the checkpoint") from None
        for s in shards:
            if not isinstance(s, str) or "/" in s or "\\" in s or not (folder / s).is_file():
                raise UserError(f"shard {s} named in {index.name} is missing from {folder}; the checkpoint is "
                                "incomplete: re-create or re-download it")
        return shards
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UserError(f"{folder} has no safetensors weights; the checkpoint is incomplete: re-create it")


def check_folder(folder: str | Path, config: dict | None = None) -> None:
    """check_structure() on a finished checkpoint folder (used by `dllmq push` and `dllmq info`)."""
    from ..models.loading import read_config

    folder = Path(folder)
    config = read_config(folder) if config is None else config
    check_structure(config, read_headers(folder, folder_shards(folder)), folder, folder=folder)


def check_structure(config: dict, tensors: dict[str, tuple[tuple[int, ...], str, str]], where: Path,
                    hint: str = "re-create the checkpoint with `dllmq quantize`",
                    folder: Path | None = None) -> QuantizationConfig:
    """Raise a one-line UserError unless `tensors` (from read_headers) hold every tensor that `config`
    (config.json with its quantization_config) needs, with the right shapes and dtypes; returns the parsed
    quantization config. With `folder` (where the shards are), each `weight_shape` must also hold the layer's
    [out, in] (16 bytes read per layer)."""
    import torch

    from ..models.loading import build_empty
    from ..models.registry import arch_for

    if not isinstance(config, dict) or not isinstance(config.get("quantization_config"), dict):
        raise UserError(f"config.json in {where} has no quantization_config; {hint}")
    qcfg = QuantizationConfig.from_dict(config["quantization_config"])
    arch = arch_for(config)
    model = build_empty(arch, arch.parse_config(config))
    spec = qcfg.weights

    def bad(what: str) -> UserError:
        return UserError(f"the checkpoint in {where} does not match its config.json: {what}; {hint}")

    def need(name: str, shape: tuple[int, ...], dtypes: tuple[str, ...], why: str = "") -> None:
        if name not in tensors:
            raise bad(f"tensor {name} is missing{why}")
        got_shape, got_dtype, _ = tensors[name]
        if got_shape != tuple(shape):
            raise bad(f"{name} has shape {list(got_shape)}, expected {list(shape)}{why}")
        if got_dtype not in dtypes:
            raise bad(f"{name} has dtype {got_dtype}, expected {' or '.join(dtypes)}{why}")

    if not qcfg.quantized_layers:
        raise bad("quantization_config lists no quantized layers")
    seen = set()
    weight_shapes: list[tuple[str, int, int]] = []
    for name in qcfg.quantized_layers:
        if name in seen:
            raise bad(f"quantization_config lists {name} twice")
        seen.add(name)
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, torch.nn.Linear):
            raise bad(f"quantization_config lists {name}, which is not a linear layer of this "
                      f"{arch.family} model")
        n, k = lin.out_features, lin.in_features
        bits = spec.num_bits
        if spec.strategy == "group" and k % spec.group_size:
            raise bad(f"group size {spec.group_size} does not divide in_features={k} of {name}")
        why = f" for a [{n}, {k}] weight quantized as {spec.describe()}"
        if bits == 8:
            need(f"{name}.weight_packed", (n, k), ("I8",), why)
        else:
            need(f"{name}.weight_packed", (n, packed_words(k, bits)), ("I32",), why)
        rows, groups = (1, 1) if spec.strategy == "tensor" else (n, spec.groups(k))
        need(f"{name}.weight_scale", (rows, groups), FLOAT_DTYPES, why)
        if not spec.symmetric:
            if bits == 8:
                need(f"{name}.weight_zero_point", (rows, groups), ("I8",), why + " (asymmetric)")
            else:
                need(f"{name}.weight_zero_point", (packed_words(rows, bits), groups), ("I32",),
                     why + " (asymmetric)")
        need(f"{name}.weight_shape", (2,), ("I64",), why)
        weight_shapes.append((name, n, k))
        if lin.bias is not None:
            need(f"{name}.bias", (n,), FLOAT_DTYPES)
    # every other parameter and buffer the loader reads (runtime/loader.py), with the shape config.json implies
    skip = tuple(f"{n}." for n in qcfg.quantized_layers) + tuple(f"{n}.{TRANSFORM_PREFIX}." for n in qcfg.transforms)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(skip):
            continue
        dtypes = FLOAT_DTYPES if t.is_floating_point() else (_st_dtype(t.dtype),)
        need(name, tuple(t.shape), dtypes)
    if folder is not None:
        _check_weight_shape_values(Path(folder), tensors, weight_shapes, bad)
    return qcfg


def _check_weight_shape_values(folder: Path, tensors, layers: list[tuple[str, int, int]], bad) -> None:
    from safetensors import SafetensorError, safe_open

    handles: dict = {}
    try:
        for layer, n, k in layers:
            key = f"{layer}.weight_shape"
            shard = tensors[key][2]
            if shard not in handles:
                handles[shard] = safe_open(folder / shard, "pt")
            got = handles[shard].get_tensor(key).flatten().tolist()
            if got != [n, k]:
                raise bad(f"{key} holds {got}, expected [{n}, {k}]")
    except (SafetensorError, OSError) as e:
        raise bad(f"a weight_shape tensor cannot be read ({str(e).splitlines()[0]})") from None
    finally:
        handles.clear()


def _st_dtype(dtype) -> str:
    import torch

    return {torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}.get(dtype, str(dtype))
