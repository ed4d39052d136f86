"""Quantization recipes: one typed description of a `dllmq quantize` run.

A recipe is what a run does to the weights, independent of where it runs (device, output folder):

    method: gptq
    weights: {bits: 4, group_size: 32, symmetric: true}   # group_size -1 = one scale per output channel
    activations: {bits: 8}                                 # optional; 16 = not quantized
    calibration: {mask: none, samples: 8}
    options: {damp: 0.01}                                  # method-specific, validated by the method
    ignore: []                                             # extra full-precision layers (regex, full match)

`dllmq quantize MODEL --recipe recipe.yaml` and `dllmq.quantize(MODEL, "recipe.yaml", out=...)` run the
same recipe through one call path (`run`); every `dllmq quantize` flag is a recipe field (`CLI_FIELDS`), and a
flag given explicitly overrides the file's field. The checkpoint records the fully resolved recipe (the
method's paper defaults filled in) in config.json's quantization_config["recipe"]; `recipe_of(checkpoint)`
reads it back and `Recipe.to_yaml()` writes a file that reproduces the run.

This module imports no torch until a recipe is run, so a bad recipe is refused at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UserError

RECIPE_KEY = "recipe"  # key of the resolved recipe inside config.json's quantization_config

# `dllmq quantize` parameter -> recipe field ("options.x": a method option). One table for both the mapping of
# the CLI onto recipes and for naming the right thing in errors (a flag on the command line, a field in a file).
CLI_FIELDS: dict[str, str] = {
    "method": "method",
    "w": "weights.bits",
    "group_size": "weights.group_size",
    "sym": "weights.symmetric",
    "a": "activations.bits",
    "a_sym": "activations.symmetric",
    "a_clip": "activations.clip",
    "kv_bits": "activations.kv_bits",
    "calib": "calibration.source",
    "calib_samples": "calibration.samples",
    "calib_seqlen": "calibration.seq_len",
    "calib_mask": "calibration.mask",
    "tmas_proportions": "calibration.tmas.proportions",
    "tmas_states": "calibration.tmas.states",
    "tmas_gen_length": "calibration.tmas.gen_length",
    "tmas_block_length": "calibration.tmas.block_length",
    "tmas_steps": "calibration.tmas.steps",
    "cgq": "options.cgq",
    "cgq_masked": "options.cgq_masked",
    "cgq_visible": "options.cgq_visible",
    "w_quantizer": "options.w_quantizer",
    "w_clip": "options.w_clip",
    "alpha": "options.alpha",
    "ia_aq": "options.ia_aq",
    "duquant_block": "options.block",
    "duquant_steps": "options.steps",
    "scale_search": "options.scale_search",
    "damp": "options.damp",
    "act_order": "options.act_order",
    "ignore": "ignore",
    "sequential": "sequential",
    "seed": "seed",
    "dtype": "dtype",
}
FIELD_FLAGS: dict[str, str] = {f: "--" + p.replace("_", "-") for p, f in CLI_FIELDS.items()}


def option_flag(option: str) -> str:
    """The `dllmq quantize` flag that sets a method option (options without a flag: --name)."""
    return FIELD_FLAGS.get(f"options.{option}", "--" + option.replace("_", "-"))


# --------------------------------------------------------------------------------------------------------------
# the typed recipe


@dataclass
class WeightsRecipe:
    bits: int = 4
    group_size: int | None = None  # None: the method's paper default; -1: one scale per output channel
    symmetric: bool | None = None  # None: the method's paper default


@dataclass
class ActivationsRecipe:
    bits: int = 16  # 16: not quantized; 8 or 4: dynamic per token
    symmetric: bool | None = None
    clip: float | None = None
    kv_bits: int | None = None  # K/V quantization; None: the method's paper protocol


@dataclass
class TMASRecipe:
    proportions: list[float] = field(default_factory=lambda: [0.3, 0.2, 0.2, 0.3])
    states: int = 4
    gen_length: int = 64
    block_length: int = 32
    steps: int = 64


@dataclass
class CalibrationRecipe:
    source: str = "bundled"  # bundled, a .txt/.jsonl file, or a Hub dataset
    samples: int = 32
    seq_len: int = 128
    mask: str = "tmas"  # none | random | tmas
    tmas: TMASRecipe = field(default_factory=TMASRecipe)


@dataclass
class Recipe:
    """A quantization run's settings. Build one in Python, from a dict (`from_dict`) or a YAML/JSON file
    (`from_file`); `resolve()` validates it and fills in the method's defaults."""

    method: str = "rtn"
    weights: WeightsRecipe = field(default_factory=WeightsRecipe)
    activations: ActivationsRecipe = field(default_factory=ActivationsRecipe)
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    options: dict = field(default_factory=dict)  # method-specific, validated by Method.resolve_options
    ignore: list[str] = field(default_factory=list)  # regex (full match) of layers kept in full precision
    sequential: bool = True
    seed: int = 0
    dtype: str = "auto"  # dtype of the block computations during calibration (auto: pipeline.calibration_dtype)

    # -- conversions ------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "Recipe":
        """Strict: an unknown field or a value of the wrong type is a UserError naming the field."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise UserError(f"a recipe must be a mapping of fields, got {type(data).__name__}")
        return _build(cls, data, "")

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(read_recipe_file(path))

    @classmethod
    def coerce(cls, recipe: "Recipe | Mapping | str | Path | None") -> "Recipe":
        """A Recipe, a dict, or a YAML/JSON file path -> a (copied) Recipe."""
        if isinstance(recipe, Recipe):
            return cls.from_dict(recipe.to_dict())  # a copy, checked like a file
        if isinstance(recipe, (str, Path)):
            return cls.from_file(recipe)
        return cls.from_dict(recipe)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        """The recipe as YAML (JSON, which YAML reads too, when PyYAML is not installed)."""
        try:
            import yaml
        except ImportError:
            return self.to_json()
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix.lower() == ".json" else self.to_yaml())
        return path

    # -- overrides --------------------------------------------------------------------------------------------

    def override(self, overrides: Mapping[str, Any] | None = None, display: Callable[[str], str] | None = None,
                 **kw) -> "Recipe":
        """A new recipe with fields replaced. Keys are top-level fields (a mapping value for a section or
        `options` is merged into it: weights={"bits": 8}), or dotted paths ("weights.bits", "options.damp");
        "__" works as the dot in keyword arguments (weights__bits=8)."""
        d = self.to_dict()
        for key, value in {**(overrides or {}), **kw}.items():
            path = key.replace("__", ".").split(".")
            _set_path(d, path, value, key if display is None else display(key))
        return Recipe.from_dict(d)

    # -- resolution -------------------------------------------------------------------------------------------

    def resolve(self, style: str = "recipe") -> "Recipe":
        """Validate everything that needs neither the model nor torch-heavy work, then fill in the method's
        paper defaults: the full recipe that the checkpoint records. Errors name recipe fields (style
        "recipe") or `dllmq quantize` flags (style "cli")."""
        with _naming(style):
            return self._resolve(style)

    def _resolve(self, style: str) -> "Recipe":
        from .validation import check_quantize_args

        w, a, c, t = self.weights, self.activations, self.calibration, self.calibration.tmas
        opt = dict(self.options)

        def num(k):  # the shared checks take numbers; other types are refused by the method's validators
            v = opt.get(k)
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        def text(k):
            v = opt.get(k)
            return v if isinstance(v, str) else None

        check_quantize_args(
            method=self.method, w=w.bits, a=a.bits, group_size=w.group_size, sym=w.symmetric, calib_mask=c.mask,
            w_quantizer=text("w_quantizer"), calib_samples=c.samples, calib_seqlen=c.seq_len,
            scale_search=text("scale_search"), damp=num("damp"), a_clip=a.clip, w_clip=num("w_clip"),
            alpha=num("alpha"), tmas_proportions=",".join(map(str, t.proportions)), tmas_states=t.states,
            tmas_gen_length=t.gen_length, tmas_block_length=t.block_length, tmas_steps=t.steps,
            duquant_block=num("block"), duquant_steps=num("steps"), device="cpu", dtype=self.dtype)
        from .validation import DTYPES
        from .quantization.methods import get_method
        from .quantization.spec import ActSpec, KVCacheSpec, WeightSpec

        m_cls = get_method(self.method)
        gs = w.group_size if w.group_size is not None else (
            -1 if m_cls.default_group_size is None else m_cls.default_group_size)
        sym = m_cls.default_weight_symmetric if w.symmetric is None else w.symmetric
        WeightSpec(num_bits=w.bits, symmetric=sym, strategy="channel" if gs == -1 else "group",
                   group_size=None if gs == -1 else gs)  # checks bits and group size
        a_sym = m_cls.default_act_symmetric if a.symmetric is None else a.symmetric
        a_clip = m_cls.act_clip_for(a.bits) if a.clip is None else float(a.clip)
        ActSpec(num_bits=a.bits, clip_ratio=a_clip, symmetric=a_sym)
        kv_bits = m_cls.default_kv_bits(a.bits) if a.kv_bits is None else int(a.kv_bits)
        KVCacheSpec(num_bits=kv_bits)  # checks the bits
        if m_cls.quantizes_activations and a.bits >= 16:
            raise UserError(f"--method {self.method} is a weight-activation method: pass --a 8 or --a 4"
                            if style == "cli" else f"method {self.method} is a weight-activation method: "
                            "set activations.bits to 8 or 4")
        if "seed" in m_cls.OPTIONS and opt.get("seed") is None:
            opt["seed"] = self.seed
        display = option_flag if style == "cli" else (lambda k: f"options.{k}")
        options = m_cls.resolve_options(opt, display=display, weight_bits=w.bits)  # refuses what it would ignore
        resolved = Recipe(
            method=self.method,
            weights=WeightsRecipe(bits=w.bits, group_size=gs, symmetric=sym),
            activations=ActivationsRecipe(bits=a.bits, symmetric=a_sym, clip=a_clip, kv_bits=kv_bits),
            calibration=replace(c, tmas=replace(t, proportions=[float(p) for p in t.proportions])),
            options=options, ignore=list(self.ignore), sequential=self.sequential, seed=self.seed,
            dtype=self.dtype if self.dtype == "auto" else DTYPES[self.dtype])
        if c.mask == "tmas" and m_cls.needs_calibration:
            resolved.tmas_config().validate()
        return resolved

    # -- what the pipeline takes ------------------------------------------------------------------------------

    def tmas_config(self):
        from .calibration.states import TMASConfig

        t = self.calibration.tmas
        return TMASConfig(proportions=tuple(float(p) for p in t.proportions), states_per_prompt=t.states,
                          gen_length=t.gen_length, block_length=t.block_length, steps=t.steps)

    def calib_options(self):
        from .pipeline import CalibOptions

        c = self.calibration
        return CalibOptions(calib=c.source, samples=c.samples, seq_len=c.seq_len, mask=c.mask, seed=self.seed,
                            tmas=self.tmas_config())

    def quantization_config(self, default_ignore: list[str]):
        """The checkpoint's QuantizationConfig (call on a resolved recipe); it records the recipe."""
        from .quantization.methods import get_method
        from .quantization.spec import ActSpec, WeightSpec
        from .runtime.kv_quant import default_kv_spec

        m_cls = get_method(self.method)
        w, a = self.weights, self.activations
        wspec = WeightSpec(num_bits=w.bits, symmetric=bool(w.symmetric),
                           strategy="channel" if w.group_size == -1 else "group",
                           group_size=None if w.group_size == -1 else w.group_size)
        aspec = ActSpec(num_bits=a.bits, clip_ratio=float(a.clip), symmetric=bool(a.symmetric))
        return _recorded_config_class()(method=self.method, weights=wspec, activations=aspec,
                                        ignore=list(default_ignore) + list(self.ignore),
                                        kv_cache=default_kv_spec(m_cls, a.bits, a.kv_bits), recipe=self.to_dict())

    def default_out(self, model: str | None) -> Path:
        name = model or "tiny"
        base = Path(name.rstrip("/")).name if Path(name).exists() else name.split("/")[-1]
        return Path(f"{base}-w{self.weights.bits}a{self.activations.bits}-{self.method}")


# --------------------------------------------------------------------------------------------------------------
# running a recipe: the one call path of `dllmq quantize` and `dllmq.quantize`


def run(model: str | Path | None, recipe: "Recipe | Mapping | str | Path | None", out: str | Path | None = None, *,
        overwrite: bool = False, device: str = "cpu", revision: str | None = None,
        offload_dir: str | Path | None = None, resume: bool = False, show_progress: bool = False,
        command: str | None = None, style: str = "recipe", resolved: bool = False):
    """Quantize `model` with `recipe` (resolved here unless `resolved`) and write the checkpoint to `out`.
    Returns the pipeline's QuantizeResult with `.recipe`, the resolved recipe it recorded."""
    rec = recipe if resolved and isinstance(recipe, Recipe) else Recipe.coerce(recipe).resolve(style)
    flag = (lambda f: f) if style == "cli" else (lambda f: {"--offload-dir": "offload_dir", "--device": "device"}[f])
    if offload_dir is not None and Path(offload_dir).exists() and not Path(offload_dir).is_dir():
        raise UserError(f"{flag('--offload-dir')} {offload_dir} is a file; give a folder (it is created if missing)")
    from .validation import check_device_name

    try:
        check_device_name("cpu" if device == "auto" else str(device))  # auto: CUDA when available, else CPU
    except UserError:
        raise UserError(f"{flag('--device')} must be auto, cpu, cuda, cuda:N or mps; got {device!r}") from None
    from .validation import check_calib_source

    with _naming(style):  # a local calibration file must be readable text: checked at once
        check_calib_source(rec.calibration.source)
    name = str(model) if model not in (None, "") else "tiny"
    out = Path(out) if out is not None else rec.default_out(name)
    from .checkpoint.lock import RunLock

    RunLock(out).check()  # another run writing the same output: refuse before loading anything

    from .validation import resolve_device, torch_dtype
    from .models.loading import read_config, resolve_model_path
    from .models.registry import arch_for
    from .pipeline import quantize as pipeline_quantize

    device = resolve_device(str(device))  # "auto" -> cuda / cpu
    src = resolve_model_path(name, revision)
    arch = arch_for(read_config(src))
    qcfg = rec.quantization_config(arch.default_ignore())
    res = pipeline_quantize(name, qcfg, out, overwrite=overwrite, device=str(device), dtype=rec.dtype if rec.dtype == "auto" else torch_dtype(rec.dtype),
                            revision=revision, command=command or f"dllmq.quantize({name!r}, recipe)",
                            method_options=dict(rec.options), calib=rec.calib_options(), sequential=rec.sequential,
                            offload_dir=offload_dir, resume=resume, show_progress=show_progress)
    res.recipe = rec
    return res


def quantize(model: str | Path | None, recipe: "Recipe | Mapping | str | Path | None" = None,
             out: str | Path | None = None, *, overwrite: bool = False, device: str = "auto",
             revision: str | None = None, offload_dir: str | Path | None = None, resume: bool = False,
             show_progress: bool = False, **overrides):
    """Quantize MODEL (a folder, Hub id or "tiny") with RECIPE (a Recipe, a dict, or a YAML/JSON file path) and
    write a packed checkpoint to OUT (default ./<model>-w<W>a<A>-<method>). Keyword `overrides` replace recipe
    fields: method="gptq", weights={"bits": 8}, options={"damp": 0.05}, **{"calibration.samples": 8}, or
    calibration__samples=8. Returns a QuantizeResult (out, per-layer reports, seconds, .recipe: the resolved
    recipe the checkpoint records)."""
    rec = Recipe.coerce(recipe)
    if overrides:
        rec = rec.override(overrides)
    return run(model, rec, out, overwrite=overwrite, device=device, revision=revision, offload_dir=offload_dir,
               resume=resume, show_progress=show_progress, style="recipe")


# --------------------------------------------------------------------------------------------------------------
# reading recipes from files and checkpoints


def read_recipe_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file {p} does not exist" if not p.exists() else f"recipe {p} is not a file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {p}: {getattr(e, 'strerror', None) or e}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"recipe {p} is not valid JSON (line {e.lineno}: {e.msg})") from None
    else:
        try:
            import yaml
        except ImportError:
            try:  # JSON is YAML too
                data = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(f"recipe {p}: reading YAML needs PyYAML (pip install pyyaml); or write the recipe "
                                "as JSON") from None
        else:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" (line {mark.line + 1})" if mark is not None else ""
                raise UserError(f"recipe {p} is not valid YAML{where}: "
                                f"{getattr(e, 'problem', None) or 'parse error'}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {p} must hold a mapping of fields (method, weights, ...), got {type(data).__name__}")
    return data


def recipe_of(checkpoint: str | Path) -> Recipe:
    """The resolved recipe a dllmq checkpoint was made with (config.json's quantization_config["recipe"]).
    For checkpoints written before recipes were recorded, the recipe is rebuilt from the quantization config
    and the manifest (calibration settings then are the defaults)."""
    from .models.loading import read_config, resolve_model_path

    p = resolve_model_path(checkpoint)
    q = read_config(p).get("quantization_config")
    if not isinstance(q, dict):
        raise UserError(f"{p} is not a quantized dllmq checkpoint; it has no recipe")
    if isinstance(q.get(RECIPE_KEY), dict):
        return Recipe.from_dict(q[RECIPE_KEY])
    w, a, kv = q.get("weights") or {}, q.get("input_activations") or {}, q.get("kv_cache") or {}
    from .models.registry import arch_for

    try:
        default_ignore = arch_for(read_config(p)).default_ignore()
    except UserError:
        default_ignore = []
    gs = w.get("group_size") if w.get("strategy", "group") == "group" else -1
    return Recipe.from_dict({
        "method": q.get("method", "rtn"),
        "weights": {"bits": w.get("num_bits", 4), "group_size": gs, "symmetric": w.get("symmetric", True)},
        "activations": {"bits": a.get("num_bits", 16), "symmetric": a.get("symmetric"),
                        "clip": a.get("clip_ratio"), "kv_bits": kv.get("num_bits", 16)},
        "options": dict(q.get("method_args") or {}),
        "ignore": [x for x in q.get("ignore", []) if x not in default_ignore],
    })


# --------------------------------------------------------------------------------------------------------------
# internals


_RECORDED = None


def _recorded_config_class():
    """QuantizationConfig that also writes the resolved recipe into config.json's quantization_config."""
    global _RECORDED
    if _RECORDED is None:
        from .checkpoint.format import QuantizationConfig

        @dataclass
        class RecipeQuantizationConfig(QuantizationConfig):
            recipe: dict = field(default_factory=dict)

            def to_dict(self) -> dict:
                d = super().to_dict()
                if self.recipe:
                    d[RECIPE_KEY] = self.recipe
                return d

        _RECORDED = RecipeQuantizationConfig
    return _RECORDED


_TYPES = {"bits": int, "group_size": int, "symmetric": bool, "clip": float, "kv_bits": int, "proportions": list,
          "states": int, "gen_length": int, "block_length": int, "steps": int, "source": str, "samples": int,
          "seq_len": int, "mask": str, "method": str, "options": dict, "ignore": list, "sequential": bool,
          "seed": int, "dtype": str}


def _check_type(name: str, key: str, v):
    want = _TYPES.get(key)
    if want is None or v is None:
        return v
    if want is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return float(v) if ok else _bad(name, v, "a number")
    if want is int:
        return v if isinstance(v, int) and not isinstance(v, bool) else _bad(name, v, "an integer")
    if want is bool:
        return v if isinstance(v, bool) else _bad(name, v, "true or false")
    if want is str:
        return v if isinstance(v, str) else _bad(name, v, "a string")
    if want is list:
        if isinstance(v, tuple):
            v = list(v)
        if not isinstance(v, list):
            return _bad(name, v, "a list")
        item = (lambda x: isinstance(x, str)) if key == "ignore" else \
            (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool))
        if not all(item(x) for x in v):
            return _bad(name, v, "a list of strings" if key == "ignore" else "a list of numbers")
        return list(v)
    if want is dict:
        if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
            return _bad(name, v, "a mapping of option names to values")
        return dict(v)
    return v


def _bad(name: str, v, what: str):
    raise UserError(f"recipe field {name} must be {what}, got {v!r}")


_SECTIONS = {"weights": WeightsRecipe, "activations": ActivationsRecipe, "calibration": CalibrationRecipe,
             "tmas": TMASRecipe}


def _build(cls, data: Mapping, prefix: str):
    known = {f.name: f for f in fields(cls)}
    kw = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if k not in known:
            where = "the recipe" if not prefix else prefix[:-1]
            raise UserError(f"unknown recipe field {name!r}; {where} accepts: {', '.join(known)}")
        if k in _SECTIONS:
            if v is None:
                v = {}
            if not isinstance(v, Mapping):
                raise UserError(f"recipe field {name} must be a mapping (e.g. {name}: {{...}}), got {v!r}")
            kw[k] = _build(_SECTIONS[k], v, f"{name}.")
        elif v is None:
            if k in ("options", "ignore"):
                continue  # empty
            if known[k].default is not None:
                raise UserError(f"recipe field {name} needs a value")
            kw[k] = None  # the method's default
        else:
            kw[k] = _check_type(name, k, v)
    return cls(**kw)


def _set_path(d: dict, path: list[str], value, shown: str) -> None:
    cur = d
    for i, part in enumerate(path[:-1]):
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            raise UserError(f"unknown recipe field {'.'.join(path[:i + 1])!r} (override {shown!r})")
        cur = nxt
    last = path[-1]
    in_options = len(path) >= 2 and path[-2] == "options"
    if last not in cur and not in_options:
        raise UserError(f"unknown recipe field {'.'.join(path)!r} (override {shown!r})")
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping) and isinstance(cur.get(last), dict) and not in_options:
        for k, v in value.items():
            _set_path(cur, [last, str(k)], v, f"{shown}.{k}")
    else:
        cur[last] = value


class _naming:
    """Within `Recipe.resolve(style="recipe")`, messages of the shared checks (written for the CLI) name the
    recipe field instead of the flag: "--calib-samples must be positive" -> "calibration.samples must be ..."."""

    _FLAG = re.compile(r"--[a-z][a-z0-9-]*")

    def __init__(self, style: str):
        self.style = style

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.style == "recipe" and exc_type is UserError:
            flags = {v: k for k, v in FIELD_FLAGS.items()}
            msg = self._FLAG.sub(lambda m: flags.get(m.group(0), m.group(0)), str(exc))
            raise UserError(msg) from None
        return False

