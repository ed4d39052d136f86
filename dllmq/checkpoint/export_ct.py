"""Export a dllmq checkpoint as a compressed-tensors checkpoint (`dllmq export --format compressed-tensors`).

Everything is written here with safetensors; compressed-tensors is not needed at run time (the tests
read the result back with it). The layout follows compressed-tensors 0.20 (see docs/format.md,
"Export to compressed-tensors"):

* weight-only int2..int8 -> format ``pack-quantized``: per linear ``weight_packed`` (int32
  ``[N, ceil(K*bits/32)]``, offset-binary values densely packed along the input dim, element 0 in
  the lowest bits), ``weight_scale`` (``[N, G]`` group, ``[N, 1]`` channel, ``[1]`` tensor),
  ``weight_shape`` (int64 ``[N, K]``) and, when asymmetric, ``weight_zero_point`` (group/channel:
  packed the same way along the output dim, int32 ``[ceil(N*bits/32), G]``; tensor: int8 ``[1]``).
  For 2/3/4 bits this is byte for byte dllmq's own layout; 8-bit codes, which dllmq stores as int8,
  are repacked four to a word.
* W8A8 with dynamic per-token int8 activations -> format ``int-quantized``: ``weight`` int8
  ``[N, K]``, ``weight_scale``, ``weight_zero_point`` int8 (asymmetric only, unpacked); the
  activation scheme lives only in config.json.
* config.json: the model's own config plus a compressed-tensors `quantization_config` with one config
  group whose target is a `re:` pattern for the block linears, and the unquantized linears in `ignore`.
* anything a compressed-tensors loader could not reproduce (online input transforms of QuaRot,
  DuQuant or unfolded SmoothQuant scales, IA-AQ / --a-clip activation clipping, int4 activations,
  W4A8) is refused with a UserError before anything is written.

Output goes to a hidden temporary sibling folder that is renamed into place at the end, as for
dllmq's own checkpoints (checkpoint/writer.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..errors import UserError
from .format import MANIFEST, QUANT_SUFFIXES, QuantizationConfig
from .packing import pack_cols, pack_rows, packed_words, unpack_cols
from .writer import TOKENIZER_FILES, _file_mode, check_parent_writable, sha256_file, verify_manifest

# The compressed-tensors release whose on-disk layout this exporter writes and is tested against.
# (3-bit weights need readers >= 0.18: earlier releases padded each int32 word instead of packing densely.)
CT_VERSION = "0.20.0"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
EXPORT_INFO = "dllmq_export.json"


@dataclass
class ExportResult:
    out: Path
    format: str
    quantized_layers: int
    ignored: list[str]
    scheme: dict
    bytes: int
    seconds: float
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"out": str(self.out), "format": self.format, "quantized_layers": self.quantized_layers,
                "ignore": self.ignored, "scheme": self.scheme, "bytes": self.bytes,
                "seconds": round(self.seconds, 2), "files": self.files}


# -- what can be expressed ---------------------------------------------------------------------

def _refuse(src: Path, what: str, fix: str) -> UserError:
    return UserError(f"cannot export {src} to compressed-tensors: {what}; {fix}")


def check_exportable(qcfg: QuantizationConfig, src: Path) -> str:
    """Return the compressed-tensors format for `qcfg`, or raise a one-line UserError saying what
    cannot be expressed and what to do instead."""
    requant = "re-quantize with --method rtn, gptq or awq (weight-only) or keep the dllmq format"
    if qcfg.transforms:
        from ..runtime.transforms import summarize

        what = summarize(qcfg.transforms.values())
        raise _refuse(src, f"its {qcfg.method} layers need {what} at run time, which compressed-tensors "
                           "loaders do not apply", requant)
    if qcfg.kv_cache.enabled or qcfg.kv_cache.rotate_qk:
        raise _refuse(src, f"its keys/values are quantized per token and head at {qcfg.kv_cache.num_bits} bits "
                           "(--kv-bits), which compressed-tensors' kv_cache_scheme cannot express",
                      "re-quantize with --kv-bits 16, or keep the dllmq format")
    w, a = qcfg.weights, qcfg.activations
    if not a.enabled:
        return PACK_QUANTIZED
    if a.num_bits != 8 or w.num_bits != 8:
        raise _refuse(src, f"W{w.num_bits}A{a.num_bits} is not exportable (compressed-tensors checkpoints "
                           "here are weight-only int2-8 or W8A8 with dynamic per-token int8 activations)",
                      "re-quantize with --a 16, or with --w 8 --a 8, or keep the dllmq format")
    if a.clip_ratio != 1.0:
        raise _refuse(src, f"activation clipping ratio {a.clip_ratio} (--a-clip) has no equivalent in "
                           "compressed-tensors' dynamic per-token scheme",
                      "re-quantize with --a-clip 1.0, or keep the dllmq format")
    return INT_QUANTIZED


def scheme_dict(qcfg: QuantizationConfig, fmt: str, targets: list[str]) -> dict:
    """One `config_groups` entry, with compressed-tensors' QuantizationScheme field names."""
    w = qcfg.weights
    weights = {
        "num_bits": w.num_bits, "type": "int", "symmetric": w.symmetric, "strategy": w.strategy,
        "group_size": w.group_size if w.strategy == "group" else None, "block_structure": None,
        "dynamic": False,
        # dllmq's --act-order keeps static groups (no g_idx): compressed-tensors calls that "weight"
        "actorder": "weight" if qcfg.method_args.get("act_order") else None,
        "observer": "minmax", "observer_kwargs": {},
    }
    acts = None
    if fmt == INT_QUANTIZED:
        a = qcfg.activations
        acts = {"num_bits": a.num_bits, "type": "int", "symmetric": a.symmetric, "strategy": "token", "group_size": None,
                "block_structure": None, "dynamic": True, "actorder": None, "observer": None,
                "observer_kwargs": {}}
    return {"targets": targets, "weights": weights, "input_activations": acts, "output_activations": None,
            "format": fmt}


def quantization_config(qcfg: QuantizationConfig, fmt: str, targets: list[str], ignore: list[str]) -> dict:
    """The `quantization_config` block of config.json (compressed-tensors' ModelCompressor layout)."""
    return {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "format": fmt,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "config_groups": {"group_0": scheme_dict(qcfg, fmt, targets)},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
    }


# -- tensors -----------------------------------------------------------------------------------

def convert_layer(name: str, t: dict[str, torch.Tensor], qcfg: QuantizationConfig, fmt: str) -> dict[str, torch.Tensor]:
    """dllmq tensors of one quantized linear (local names weight_packed, weight_scale, ...) ->
    compressed-tensors tensors (full names)."""
    w = qcfg.weights
    bits = w.num_bits
    for key in ("weight_packed", "weight_scale", "weight_shape"):
        if key not in t:
            raise UserError(f"{name}.{key} is missing from the checkpoint; it is incomplete")
    shape = t["weight_shape"].flatten().tolist()
    if len(shape) != 2 or min(shape) <= 0:
        raise UserError(f"{name}.weight_shape must hold [out_features, in_features], got {shape}")
    n, k = int(shape[0]), int(shape[1])
    g = w.groups(k)
    packed, scale = t["weight_packed"], t["weight_scale"]
    exp_packed = (n, k) if bits == 8 else (n, packed_words(k, bits))
    exp_scale = (1, 1) if w.strategy == "tensor" else (n, g)
    if tuple(packed.shape) != exp_packed or tuple(scale.shape) != exp_scale:
        raise UserError(f"{name}: weight_packed {tuple(packed.shape)} / weight_scale {tuple(scale.shape)} do not "
                        f"match weight_shape {shape} and the config ({w.describe()}); the checkpoint is corrupt")
    out = {}
    if fmt == PACK_QUANTIZED:  # int-quantized stores the unpacked weight, so no shape
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    # compressed-tensors expects [1] for a per-tensor scale / zero point, [N, G] otherwise
    out[f"{name}.weight_scale"] = scale.reshape(1).contiguous() if w.strategy == "tensor" else scale.contiguous()
    if fmt == INT_QUANTIZED:  # 8-bit codes stored unpacked as int8 `weight`
        out[f"{name}.weight"] = packed.to(torch.int8).contiguous()
    elif bits == 8:  # dllmq keeps 8-bit codes as int8; compressed-tensors packs 4 per int32 word
        out[f"{name}.weight_packed"] = pack_rows(packed.to(torch.int32), 8)
    else:  # identical dense little-endian offset-binary layout
        out[f"{name}.weight_packed"] = packed.to(torch.int32).contiguous()
    if not w.symmetric:
        zp = t.get("weight_zero_point")
        if zp is None:
            raise UserError(f"{name}.weight_zero_point is missing from an asymmetric checkpoint; it is incomplete")
        rows = 1 if w.strategy == "tensor" else n
        z = zp.to(torch.int32) if bits == 8 else unpack_cols(zp.to(torch.int32), bits, rows)
        if tuple(z.shape) != exp_scale:
            raise UserError(f"{name}.weight_zero_point has shape {tuple(zp.shape)}, inconsistent with "
                            f"weight_shape {shape}; the checkpoint is corrupt")
        if w.strategy == "tensor":
            out[f"{name}.weight_zero_point"] = z.reshape(1).to(torch.int8)
        elif fmt == INT_QUANTIZED:
            out[f"{name}.weight_zero_point"] = z.to(torch.int8).contiguous()
        else:
            out[f"{name}.weight_zero_point"] = pack_cols(z, bits)
    return out


# -- the export --------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file; choose a new folder with --out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} already exists and is not empty; choose a new folder with --out "
                        "or delete it first")
    check_parent_writable(out)


def _shard_files(src: Path) -> dict[str, str]:
    """tensor name -> shard file name (the source's index, or its single model.safetensors)."""
    from ..models.loading import weight_map

    return weight_map(src)


def _linears(src: Path, tensor_names: set[str]) -> tuple[list[str], str]:
    """Full names of the model's nn.Linear modules (every block linear, then the LM head when it has
    its own weight; the ArchSpec lists them, so no module tree is built), and a `re:` target that
    matches exactly the block linears.

    The target names the block linears rather than the class "Linear": tools that only see tensor
    names (compressed-tensors' model-free converters) read "Linear" as "every tensor", which for
    int-quantized (whose packed tensor is called `weight`) takes in the embedding and final norm."""
    from ..models.loading import parse

    arch, cfg = parse(src)
    names = [f"{arch.blocks_path}.{i}.{n}" for i in range(cfg.num_layers) for n in arch.block_linears]
    if f"{arch.head_name}.weight" in tensor_names or f"{arch.head_name}.weight_packed" in tensor_names:
        names.append(arch.head_name)
    alts = "|".join(re.escape(n) for n in arch.block_linears)
    return names, rf"re:^{re.escape(arch.blocks_path)}\.\d+\.(?:{alts})$"


def export_compressed_tensors(checkpoint: str | os.PathLike, out: str | os.PathLike, verify: bool = True) -> ExportResult:
    """Convert the dllmq checkpoint `checkpoint` into a compressed-tensors checkpoint in `out`."""
    from ..models.loading import read_config, resolve_model_path

    t0 = time.time()
    src = resolve_model_path(str(checkpoint))
    out = Path(out)
    raw = read_config(src)
    qraw = raw.get("quantization_config")
    if qraw is None:
        raise UserError(f"{src} is not quantized; quantize it first with `dllmq quantize`")
    if not isinstance(qraw, dict):
        QuantizationConfig.from_dict(qraw)  # the one-line error for a malformed quantization_config
    if qraw.get("quant_method") != "dllmq":
        raise UserError(f"{src} is not a dllmq checkpoint (quant_method {qraw.get('quant_method')!r}); "
                        "export converts checkpoints written by `dllmq quantize`")
    qcfg = QuantizationConfig.from_dict(qraw)
    fmt = check_exportable(qcfg, src)
    _check_out(out)
    if verify:
        verify_manifest(src)

    wmap = _shard_files(src)
    linears, target = _linears(src, set(wmap))
    quantized = list(qcfg.quantized_layers)
    unknown = sorted(set(quantized) - set(linears))
    if unknown:
        raise UserError(f"quantized layer {unknown[0]} is not a linear of this {raw.get('model_type')} model; "
                        "the checkpoint's config.json does not match its tensors")
    qset = set(quantized)
    ignore = [n for n in linears if n not in qset]

    shards = sorted(set(wmap.values()))
    layer_shard = {}
    for name in quantized:
        key = f"{name}.weight_packed"
        if key not in wmap:
            raise UserError(f"{key} is missing from {src}; the checkpoint is incomplete")
        layer_shard[name] = wmap[key]
    quant_keys = {f"{n}.{s}" for n in quantized for s in QUANT_SUFFIXES}

    tmp = out.resolve().parent / f".{out.name}.export-partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        handles = {}
        for s in shards:
            try:
                handles[s] = safe_open(src / s, "pt")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{src / s} is not a readable safetensors file ({e})") from None

        def get(key: str, shard: str | None = None) -> torch.Tensor:
            shard = shard or wmap[key]
            try:
                return handles[shard].get_tensor(key)
            except SafetensorError as e:
                raise UserError(f"cannot read {key!r} from {shard} ({e}); the file is corrupt") from None

        weight_map, total, n_out = {}, 0, len(shards)
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n_out:05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for key in handles[shard].keys():
                if key not in quant_keys:
                    tensors[key] = get(key, shard)  # embeddings, norms, LM head, biases
            for name in (n for n in quantized if layer_shard[n] == shard):
                local = {s: get(f"{name}.{s}") for s in QUANT_SUFFIXES if f"{name}.{s}" in wmap}
                tensors.update(convert_layer(name, local, qcfg, fmt))
            tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            os.chmod(tmp / fname, _file_mode())  # safetensors creates 0600 files; the others follow the umask
            for k, v in tensors.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
            del tensors
        handles.clear()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config = {k: v for k, v in raw.items() if k != "quantization_config"}
        config["quantization_config"] = quantization_config(qcfg, fmt, [target], ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copyfile(src / f, tmp / f)  # mode from the umask, like the shards
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        src_manifest = src / MANIFEST
        info = {
            "tool": "dllmq", "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": str(src), "source_method": qcfg.method,
            "source_manifest_sha256": sha256_file(src_manifest) if src_manifest.exists() else None,
            "format": fmt, "compressed_tensors_layout": CT_VERSION,
            "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files},
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        if out.exists():  # an empty folder (checked above)
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return ExportResult(out=out, format=fmt, quantized_layers=len(quantized), ignored=ignore,
                        scheme=scheme_dict(qcfg, fmt, [target]), bytes=size, seconds=time.time() - t0,
                        files=sorted(p.name for p in out.iterdir()))
