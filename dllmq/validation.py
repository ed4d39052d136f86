"""Cheap checks of user-given values (CLI flags and recipe fields) that run before the heavy imports (torch,
transformers), so that a simple mistake is answered at once. Recipes (library code) and the CLI share them.
They repeat names owned by heavier modules; tests/test_reliability.py checks that the lists here match those
modules.
"""

from __future__ import annotations

import math
import sys

from .errors import UserError

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}

METHOD_NAMES = ("awq", "duquant", "gptq", "quarot", "rtn", "smoothquant")  # quantization/methods METHODS
WEIGHT_ACT_METHODS = ("duquant", "quarot", "smoothquant")  # their Method.quantizes_activations is True
MASK_MODES = ("none", "random", "tmas")  # calibration/states.py MASK_MODES
SCALE_SEARCHES = ("minmax", "mse")  # quantization/rtn.py SCALE_SEARCHES


def known_methods() -> tuple[str, ...]:
    """The built-in names (static, so this check needs no torch), plus any method registered in this process
    (`@register_method`: its code imported the registry already, so reading it costs nothing)."""
    registry = sys.modules.get("dllmq.quantization.methods.base")
    extra = tuple(n for n in getattr(registry, "METHODS", {}) if n not in METHOD_NAMES)
    return METHOD_NAMES + extra


def check_dtype_name(name: str) -> None:
    if name != "auto" and name not in DTYPES:
        raise UserError(f"--dtype must be one of auto, bfloat16, float16, float32; got {name!r}")


def check_device_name(name: str) -> None:
    if not (name in ("auto", "cpu", "mps", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {name!r}")


def check_positive(**flags: int | None) -> None:
    """check_positive(calib_samples=3) -> UserError naming --calib-samples if it is not > 0."""
    for key, v in flags.items():
        if v is not None and v <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {v}")


def check_finite(flag: str, v: float, lo: float | None = None, hi: float | None = None) -> None:
    """A float option must be a number (not nan/inf) inside [lo, hi]."""
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else
                                                                             f"<= {hi}")
        raise UserError(f"{flag} must be a number {rng}, got {v}")


def parse_proportions(text: str) -> tuple[float, ...]:
    """--tmas-proportions: comma-separated finite, non-negative numbers summing to 1."""
    try:
        props = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--tmas-proportions must be comma-separated numbers, got {text!r}") from None
    if not props or not all(math.isfinite(p) and p >= 0 for p in props) or abs(sum(props) - 1) > 1e-6:
        raise UserError(f"--tmas-proportions must be finite, non-negative and sum to 1 (e.g. 0.3,0.2,0.2,0.3), "
                        f"got {text!r}")
    return props


def check_quantize_args(*, method: str, w: int, a: int, group_size: int | None, sym: bool | None, calib_mask: str,
                        w_quantizer: str | None, calib_samples: int, calib_seqlen: int,
                        scale_search: str | None, damp: float | None, a_clip: float | None, w_clip: float | None,
                        alpha: float | None, tmas_proportions: str, tmas_states: int, tmas_gen_length: int,
                        tmas_block_length: int, tmas_steps: int, duquant_block: int | None,
                        duquant_steps: int | None, device: str, dtype: str, **_ignored) -> tuple[float, ...]:
    """Every check of `dllmq quantize` that needs neither torch nor the model; returns the TMAS proportions.
    Method-dependent flags are None when not given (the method's paper default applies); whether an option
    applies to the method is checked by the method's own option set (quantization/methods/base.py)."""
    from .quantization.spec import ActSpec, WeightSpec  # no torch

    if dtype != "auto":  # auto: chosen per method and hardware (pipeline.calibration_dtype)
        check_dtype_name(dtype)
    check_device_name(device)
    known = known_methods()
    if method not in known:
        raise UserError(f"unknown method {method!r}; supported: {', '.join(known)}")
    gs = 128 if group_size is None else group_size
    WeightSpec(num_bits=w, symmetric=True if sym is None else sym, strategy="channel" if gs == -1 else "group",
               group_size=None if gs == -1 else gs)
    if a_clip is not None:
        check_finite("--a-clip", a_clip)
    aspec = ActSpec(num_bits=a, symmetric=True, clip_ratio=1.0 if a_clip is None else a_clip)
    if method in WEIGHT_ACT_METHODS and not aspec.enabled:
        raise UserError(f"--method {method} is a weight-activation method: pass --a 8 or --a 4")
    if calib_mask not in MASK_MODES:
        raise UserError(f"--calib-mask must be one of {', '.join(MASK_MODES)}, got {calib_mask!r}")
    if w_quantizer is not None and w_quantizer not in ("rtn", "gptq"):
        raise UserError(f"--w-quantizer must be rtn or gptq, got {w_quantizer!r}")
    check_positive(calib_samples=calib_samples, calib_seqlen=calib_seqlen, tmas_states=tmas_states,
                   tmas_gen_length=tmas_gen_length, tmas_block_length=tmas_block_length, tmas_steps=tmas_steps,
                   duquant_block=duquant_block, duquant_steps=duquant_steps)
    if scale_search is not None and scale_search not in SCALE_SEARCHES:
        raise UserError(f"--scale-search must be one of {', '.join(SCALE_SEARCHES)}, got {scale_search!r}")
    if damp is not None and not (math.isfinite(damp) and 0 <= damp < 1):
        raise UserError(f"--damp must be in [0, 1), got {damp}")
    if w_clip is not None:
        check_finite("--w-clip", w_clip, 0.0, 1.0)
        if w_clip <= 0:
            raise UserError(f"--w-clip must be in (0, 1], got {w_clip}")
    if alpha is not None:
        check_finite("--alpha", alpha, 0.0, 1.0)
    return parse_proportions(tmas_proportions)


BUNDLED_CALIB = ("bundled", "tiny", "offline")  # calibration/sources.py load_items


def check_calib_source(calib: str) -> None:
    """--calib naming a local path: it must be a UTF-8 text file, and a .jsonl one must hold one JSON object per
    line. Checked before any model is loaded; a name that is not a local path is a Hub dataset (checked later)."""
    import json
    from pathlib import Path

    if calib in BUNDLED_CALIB:
        return
    p = Path(calib).expanduser()
    if not p.exists():
        return
    fix = "pass a UTF-8 .txt file, a .jsonl file with one JSON object per line, or --calib bundled"
    if p.is_dir():
        raise UserError(f"--calib {calib} is a folder; {fix}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"--calib {calib}: cannot read it ({e.strerror}); {fix}") from None
    if b"\0" in data[:1 << 16]:
        raise UserError(f"--calib {calib} is a binary file, not text; {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--calib {calib} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}; "
                        "Latin-1 or another encoding?): convert it, e.g. `iconv -f latin1 -t utf-8`, or "
                        f"{fix.replace('pass ', 'pass ', 1)}") from None
    if p.suffix != ".jsonl":
        return
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise UserError(f"--calib {calib}:{i + 1} is not valid JSON; a .jsonl file needs one JSON object per "
                            "line, e.g. {\"text\": \"...\"}") from None
        if not isinstance(d, dict):
            kind = {int: "number", float: "number", str: "string", list: "list", bool: "boolean"}.get(type(d), "null")
            raise UserError(f"--calib {calib}:{i + 1} holds a JSON {kind}, not an object; each line needs "
                            "{\"text\": \"...\"} or {\"prompt\": \"...\", \"response\": \"...\"}")


def torch_dtype(name: str, device: str = "cpu"):
    """A torch dtype for --dtype; "auto" -> the runtime default for `device` (`runtime.loader.default_dtype`)."""
    import torch

    if name == "auto":
        from .runtime.loader import default_dtype

        return default_dtype(device)
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of auto, bfloat16, float16, float32; got {name!r}")
    return getattr(torch, DTYPES[name])


def resolve_device(name: str) -> str:
    """A validated device name; 'auto' -> 'cuda' when CUDA is available, else 'cpu'."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available in this torch build; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda") or name == "mps"):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {name!r}")
    return name
