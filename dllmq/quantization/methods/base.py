"""The interface every quantization method implements.

The pipeline walks the model block by block. For each block it
  1. lets the method transform the block in place (`transform_block`: smoothing, scale folding,
     rotations; function-preserving in full precision), with a `BlockContext` that can replay the
     calibration batches through the block and return the inputs of chosen linears;
  2. creates per-layer statistics (`new_stats`, e.g. a GPTQ Hessian accumulator) and feeds them the
     inputs of each linear (groups of linears that share an input are quantized one after another,
     later groups seeing the already-quantized earlier ones);
  3. calls `quantize_linear` for every targeted linear.
The algorithms themselves are pure tensor functions in dllmq.quantization.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ...checkpoint.format import QuantizationConfig
from ...errors import UserError
from ..qweight import QuantizedWeight


def one_of(allowed: tuple):
    def check(name, v):
        if v not in allowed:
            raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}, got {v!r}")
    return check


def in_range(lo: float, hi: float, lo_open: bool = False):
    def check(name, v):
        if not (lo < float(v) <= hi if lo_open else lo <= float(v) <= hi):
            raise UserError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return check


def positive_int(name, v):
    if v < 1:
        raise UserError(f"{name} must be a positive integer, got {v!r}")


def option(default, check: Callable[[str, Any], None] | None = None):
    """A method option: its default (the paper's) and the check of its value beyond its type."""
    return field(default=default, metadata={"check": check})


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_ok(want, v) -> bool:
    if want is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if want is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, want)


@dataclass(frozen=True)
class MethodOptions:
    """A method's options, typed; one subclass per method (`Method.Options`), whose fields are exactly the
    options the method accepts, with the paper's defaults. `validate` is the one place their values are checked."""

    scale_search: str | None = option(None, one_of(("minmax", "mse")))  # None: the method's default_scale_search

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def validate(cls, values: dict, display: Callable[[str], str]) -> None:
        """One-line UserError for the first value of the wrong type or out of range (None: not given)."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            v = values.get(f.name)
            if v is None:
                continue
            want = hints[f.name]
            want = next((t for t in typing.get_args(want) if t is not type(None)), want)  # X | None -> X
            if not _type_ok(want, v):
                raise UserError(f"{display(f.name)} must be {_TYPE_WORDS.get(want, want.__name__)}, got {v!r}")
            if f.metadata.get("check"):
                f.metadata["check"](display(f.name), v)


@dataclass(frozen=True)
class GPTQRoundingOptions(MethodOptions):
    """GPTQ's options (and DLLMQuant's CGQ weighting of its Hessian), for every method that can round with GPTQ."""

    damp: float = option(0.01, in_range(0.0, 1.0))
    act_order: bool = False  # static groups keep scales aligned
    cgq: bool = False
    cgq_masked: float = option(1.0, in_range(0.0, 100.0))  # CGQ's indicator value for masked tokens
    cgq_visible: float = option(0.7, in_range(0.0, 100.0))  # ... and for visible ones
    cgq_conf_power: float = option(0.5, in_range(0.0, 10.0))  # 0.5: the square root of confidence


# Options that act through GPTQ rounding, and the CGQ settings that act only with CGQ on.
GPTQ_OPTIONS = {k: v for k, v in GPTQRoundingOptions.defaults().items() if k != "scale_search"}
CGQ_SETTINGS = ("cgq_masked", "cgq_visible", "cgq_conf_power")


@dataclass
class BlockContext:
    index: int
    prefix: str  # full name prefix of the block, e.g. "model.transformer.blocks.3."
    arch: object
    config: object
    capture_inputs: Callable[[list[str], int], dict[str, torch.Tensor]]  # local linear names -> X [T, K]
    # install(local linear name, spec, tensors): put an online input transform in place *now*, so that
    # every later capture sees the block exactly as it will run (statistics of later groups must come
    # through the transforms of earlier ones, never through folded weights without their online half).
    install: Callable[[str, dict, dict], None] = lambda name, spec, tensors: None

    def channel_stats(self, names: list[str], rows: int = 0) -> dict[str, dict[str, torch.Tensor]]:
        """Per-channel max|x| ("absmax") and mean|x| ("absmean") of the named linears' inputs over every
        calibration token (padding excluded); with `rows` > 0 also "rows", at most that many input rows
        (the seeded subsample `capture_inputs` returns), from the same pass."""
        return self.capture_inputs(names, rows, reduce=True)


class Method:
    name: ClassVar[str]
    label: ClassVar[str] = ""  # how a model card names the method (default: `name`)
    needs_calibration: ClassVar[bool] = False
    # False when transform_block never touches the weights: the pipeline then quantizes the weights
    # as stored on disk, even when the block runs in a lower-precision calibration dtype.
    rewrites_weights: ClassVar[bool] = True
    quantizes_activations: ClassVar[bool] = False
    # How weight scales are chosen unless option scale_search says otherwise (rtn.SCALE_SEARCHES).
    default_scale_search: ClassVar[str] = "minmax"
    # The paper's activation quantizer when --a-sym/--a-asym is not given (per-token, dynamic).
    default_act_symmetric: ClassVar[bool] = True
    # True: with quantized activations the paper also quantizes K and V at the activation bits
    # (`default_kv_bits`); QuaRot additionally rotates q and k by a head-dim Hadamard (`rotates_qk`).
    kv_follows_activations: ClassVar[bool] = False
    rotates_qk: ClassVar[bool] = False

    @classmethod
    def default_kv_bits(cls, act_bits: int) -> int:
        """K/V bits when --kv-bits is not given: 16, or the activation bits where the paper's protocol
        quantizes K/V with the activations (kv_follows_activations)."""
        return act_bits if cls.kv_follows_activations and act_bits < 16 else 16

    # The paper's weight quantizer when the user does not choose one (group_size None = per channel).
    default_weight_symmetric: ClassVar[bool] = True
    default_group_size: ClassVar[int | None] = 128
    # The paper's activation clipping ratio when --a-clip is not given.
    default_act_clip: ClassVar[float] = 1.0
    # The options the method accepts, typed, with their defaults (the paper's). Anything else is refused, and an
    # option that only matters in some configurations (`applicable`) is refused outside them: an
    # accepted option always changes the result (tests/test_option_contract.py). OPTIONS: their defaults, derived.
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    OPTIONS: ClassVar[dict[str, Any]] = MethodOptions.defaults()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.OPTIONS = cls.Options.defaults()

    @classmethod
    def act_clip_for(cls, act_bits: int) -> float:
        """The activation clipping ratio when --a-clip is not given."""
        return cls.default_act_clip

    @classmethod
    def defaults_for(cls, weight_bits: int | None) -> dict:
        """OPTIONS' defaults for this weight width (a paper setting may be specific to low bit widths)."""
        return dict(cls.OPTIONS)

    @classmethod
    def applicable(cls, resolved: dict) -> set[str]:
        """The options that take effect given the resolved values of the others: GPTQ's only with GPTQ
        rounding, CGQ's settings only with CGQ on."""
        return gptq_applicable(resolved, cls.OPTIONS)

    @classmethod
    def resolve_options(cls, given: dict | None, display: Callable[[str], str] | None = None,
                        weight_bits: int | None = None) -> dict:
        """Validate user options and fill in the defaults: the full option set recorded in the checkpoint.
        Options left at None count as not given. `display` names an option in errors (e.g. its CLI flag)."""
        show = display or (lambda k: f"option {k!r}")
        given = {k: v for k, v in (given or {}).items() if v is not None}
        for k, v in given.items():
            if k not in cls.OPTIONS and v is not False:  # an explicit "off" (--no-cgq) of a foreign switch is harmless
                raise UserError(f"{show(k)} does not apply to --method {cls.name}; it accepts: "
                                f"{', '.join(show(o) for o in sorted(cls.OPTIONS)) or 'no options'}")
        given = {k: v for k, v in given.items() if k in cls.OPTIONS}
        out = {**cls.defaults_for(weight_bits), **given}
        if out.get("scale_search", 0) is None:
            out["scale_search"] = cls.default_scale_search
        live = cls.applicable(out)
        for k, v in given.items():
            if k not in live and v != cls.OPTIONS[k]:
                raise UserError(f"{show(k)} has no effect on --method {cls.name} in this configuration "
                                f"({_why_inapplicable(k, out)}); drop it")
        cls.Options.validate(out, show)
        return {k: v for k, v in out.items() if k in live}

    def __init__(self, qcfg: QuantizationConfig, **options):
        self.qcfg = qcfg
        # options: the resolved dict the checkpoint records; opts: the same, typed (inapplicable ones at defaults)
        self.options = self.resolve_options(options, weight_bits=qcfg.weights.num_bits)
        self.opts = self.Options(**{**self.defaults_for(qcfg.weights.num_bits), **self.options})

    @property
    def scale_search(self) -> str:
        return self.opts.scale_search or self.default_scale_search

    @property
    def wants_confidence(self) -> bool:
        """True when statistics need the full-precision model's per-token confidence (CGQ)."""
        return bool(getattr(self.opts, "cgq", False))

    def token_weights(self, batch) -> torch.Tensor | None:
        """CGQ's per-token weights of the GPTQ Hessian (None without CGQ): mask state and confidence."""
        if not self.wants_confidence:
            return None
        from ..cgq import token_weights as cgq_token_weights

        o = self.opts
        visible, masked = float(o.cgq_visible), float(o.cgq_masked)
        return cgq_token_weights(batch.masked, batch.confidence, mask_weight=1.0 + masked - visible,
                                 base=visible, conf_power=float(o.cgq_conf_power))

    def check(self, arch, config) -> None:
        """Raise UserError before any work if the method cannot handle this model."""

    def transform_nonblock(self, tensors: dict, arch, config) -> None:
        """Rewrite (in place) the tensors outside the blocks: embeddings, final norm, LM head."""

    def transform_block(self, block: nn.Module, ctx: BlockContext) -> dict:
        """Rewrite the block in place, function-preserving once the returned online transforms are
        applied: {linear name inside the block: (spec dict, tensors dict)} (see runtime/transforms.py).
        A transform must be passed to `ctx.install` as soon as its weights are folded, before the next
        `ctx.capture_inputs`; the pipeline installs whatever is returned and not yet installed."""
        return {}

    @property
    def rounds_with_gptq(self) -> bool:
        """True when weights are rounded by GPTQ (GPTQ itself; `w_quantizer: gptq` for the others)."""
        return getattr(self.opts, "w_quantizer", "rtn") == "gptq"

    def new_stats(self, name: str):
        """An object with .add(x [T, K], token_weights [T] | None), or None if no statistics are needed.
        Default: the GPTQ Hessian (CGQ-weighted through `token_weights`) when the method rounds with GPTQ."""
        if not self.rounds_with_gptq:
            return None
        from ..gptq import HessianAccumulator

        return HessianAccumulator()

    def round_weight(self, name: str, w: torch.Tensor, stats=None, clip_ratio: float = 1.0) -> QuantizedWeight:
        """The one weight rounder every method composes, after its own transforms of `w` [N, K] (fp32):
        GPTQ (damp, act-order, the Hessian in `stats`, CGQ-weighted when on) when the method rounds with GPTQ
        and the layer saw calibration tokens, else round-to-nearest. Both use the method's scale choice
        (`scale_search`) below `clip_ratio` (a weight clip: DuQuant's 0.8)."""
        from ..gptq import gptq_quantize
        from ..grid import quantize
        from ..rtn import choose_qparams

        spec = self.qcfg.weights
        if self.rounds_with_gptq and stats is not None and stats.n_tokens:
            qw, _info = gptq_quantize(w, stats.hessian.to(w.device), spec, damp=float(self.opts.damp),
                                      act_order=bool(self.opts.act_order), clip_ratio=clip_ratio,
                                      name=name, scale_search=self.scale_search,
                                      solve_cache=getattr(stats, "solve_cache", None))
            return qw
        scale, zp = choose_qparams(w, spec, clip_ratio, self.scale_search)
        return QuantizedWeight(quantize(w, scale, zp, spec), scale, zp, spec)

    def quantize_linear(self, name: str, weight: torch.Tensor, stats=None) -> QuantizedWeight:
        """Default: `round_weight` of the (already transformed) weight; methods with per-layer weight edits
        (AWQ's clip, DuQuant's weight clip) override this and call `round_weight` themselves."""
        return self.round_weight(name, weight.float(), stats)


def gptq_applicable(resolved: dict, all_options) -> set[str]:
    """Drop GPTQ's options when the weights are rounded by RTN, and CGQ's settings when CGQ is off."""
    live = set(all_options)
    if resolved.get("w_quantizer", "gptq") != "gptq":
        live -= set(GPTQ_OPTIONS)
    if not resolved.get("cgq", False):
        live -= set(CGQ_SETTINGS)
    return live


def _why_inapplicable(k: str, resolved: dict) -> str:
    if k in GPTQ_OPTIONS and resolved.get("w_quantizer", "gptq") != "gptq":
        return "it acts on GPTQ rounding: add --w-quantizer gptq"
    if k in CGQ_SETTINGS and not resolved.get("cgq"):
        return "it is a CGQ setting: add --cgq"
    return "see the method's options"


#: Every method, by CLI name. Filled by `register_method`; the CLI's method list, the recipe's validation, the
#: model card's names and `get_method` read it.
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method subclass available by its `name` everywhere (CLI, recipes, pipeline)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method expects a Method subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (its CLI name)")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
    METHODS[name] = cls
    return cls

