"""The option contract: every option a method accepts changes the checkpoint, and everything else is refused.

Runs over the registry (quantization/methods METHODS), so a method or an option added later is covered
without touching this file, except for the alternative value an option is tried with (ALT)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dllmq.checkpoint.format import QuantizationConfig
from dllmq.errors import UserError
from dllmq.pipeline import CalibOptions, quantize
from dllmq.quantization.methods import METHODS
from dllmq.quantization.methods.base import CGQ_SETTINGS, GPTQ_OPTIONS
from dllmq.quantization.spec import ActSpec, WeightSpec

CAL = CalibOptions(mask="random", samples=4, seq_len=16, batch_size=4)  # masked tokens: CGQ acts on them

# An alternative to each option's default (a function of the default where it must differ from it).
ALT = {
    "scale_search": lambda d: "minmax" if d == "mse" else "mse",
    "w_quantizer": lambda d: "gptq" if d == "rtn" else "rtn",
    "damp": 0.5, "act_order": True, "cgq": True, "cgq_masked": 4.0, "cgq_visible": 0.05, "cgq_conf_power": 3.0,
    "w_clip": 0.6, "ia_aq": True, "alpha": 0.9, "seed": 3, "block": 16, "steps": 2, "max_rows": 8,
    "store_dtype": "float32", "grid": 2, "duo_scaling": False, "clip": False, "max_tokens": 8,
}


def _context(cls, option: str) -> dict:
    """The other options an option needs to take effect (GPTQ rounding, CGQ on)."""
    ctx = {}
    if option in GPTQ_OPTIONS and "w_quantizer" in cls.OPTIONS:
        ctx["w_quantizer"] = "gptq"
    if option in CGQ_SETTINGS:
        ctx["cgq"] = True
    if option == "scale_search" and cls.OPTIONS.get("w_clip", 1.0) < 1.0:
        # DuQuant clips at 0.8: an MSE search below that rarely beats 0.8 on small random weights
        ctx["w_clip"] = 1.0
    return ctx


def _cases():
    for name, cls in sorted(METHODS.items()):
        for option in sorted(cls.OPTIONS):
            yield pytest.param(name, option, id=f"{name}-{option}")


def _run(src, out, method, options):
    cls = METHODS[method]
    a = 4 if cls.quantizes_activations else 16
    qcfg = QuantizationConfig(method, WeightSpec(4, cls.default_weight_symmetric, "group", 32),
                              ActSpec(a, symmetric=cls.default_act_symmetric), ignore=[r"model\.transformer\.ff_out"])
    quantize(src, qcfg, out, calib=CAL, method_options=options, show_progress=False, overwrite=True)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    recorded = qc.pop("method_args")
    return tensors, qc, recorded


def _same(a, b) -> bool:
    ta, ca = a[0], a[1]
    tb, cb = b[0], b[1]
    return ca == cb and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def baselines(tiny_llada, tmp_path_factory):
    cache = {}

    def get(method, ctx):
        key = (method, tuple(sorted(ctx.items())))
        if key not in cache:
            cache[key] = _run(tiny_llada, tmp_path_factory.mktemp("base"), method, ctx)
        return cache[key]

    return get


@pytest.mark.parametrize("method,option", list(_cases()))
def test_every_accepted_option_changes_the_checkpoint(method, option, baselines, tiny_llada, tmp_path):
    cls = METHODS[method]
    default = cls.resolve_options({})[option] if option in cls.resolve_options({}) else cls.OPTIONS[option]
    alt = ALT[option](default) if callable(ALT[option]) else ALT[option]
    assert alt != default, f"ALT[{option!r}] must differ from the default {default!r}"
    ctx = _context(cls, option)
    base = baselines(method, ctx)
    changed = _run(tiny_llada, tmp_path / "q", method, {**ctx, option: alt})
    assert changed[2][option] == alt  # recorded in the checkpoint, resolved
    assert not _same(base, changed), f"{method}: option {option}={alt!r} left the checkpoint unchanged"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_and_inapplicable_options_are_refused(method):
    cls = METHODS[method]
    with pytest.raises(UserError, match="does not apply to --method"):
        cls.resolve_options({"no_such_option": 1})
    foreign = next((o for o in ("alpha", "cgq", "seed", "grid", "block") if o not in cls.OPTIONS), None)
    if foreign is not None:
        with pytest.raises(UserError, match=foreign):
            cls.resolve_options({foreign: ALT[foreign]})
    if "cgq_masked" in cls.OPTIONS:  # a CGQ setting without CGQ changes nothing: refused
        with pytest.raises(UserError, match="--cgq"):
            cls.resolve_options({**_context(cls, "damp"), "cgq_masked": 2.0})
    if "damp" in cls.OPTIONS and cls.OPTIONS.get("w_quantizer") == "rtn":
        with pytest.raises(UserError, match="--w-quantizer gptq"):
            cls.resolve_options({"damp": 0.2})


def test_library_checkpoints_record_the_resolved_options(tiny_llada, tmp_path):
    """pipeline.quantize called from Python records the full option set, paper defaults included."""
    _, _, recorded = _run(tiny_llada, tmp_path / "q", "duquant", {})
    assert recorded == METHODS["duquant"].resolve_options({})
    assert recorded["w_clip"] == 0.8 and recorded["alpha"] == 0.5 and recorded["block"] == 128


@pytest.mark.parametrize("options,message", [
    ({"damp": "high"}, "options.damp must be a number"),
    ({"act_order": "yes"}, "options.act_order must be true or false"),
    ({"block": 12.5}, "options.block must be an integer"),
    ({"store_dtype": "int8"}, "options.store_dtype must be one of float32, bfloat16, float16"),
    ({"steps": 0}, "options.steps must be positive"),
    ({"max_rows": 0}, "options.max_rows must be a positive integer"),
])
def test_typed_options_refuse_wrong_types_in_one_line(options, message, tmp_path):
    """Each method's options dataclass types its fields: a wrong type or value is one line naming the field."""
    import dllmq

    recipe = {"method": "duquant", "weights": {"bits": 4}, "activations": {"bits": 8},
              "options": {**options, "w_quantizer": "gptq"}}
    with pytest.raises(UserError) as e:
        dllmq.quantize("tiny", recipe, out=tmp_path / "q")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "q").exists()


def test_options_dataclass_is_the_single_source_of_defaults():
    for name, cls in METHODS.items():
        assert cls.OPTIONS == {f: getattr(cls.Options(), f) for f in cls.OPTIONS}, name
        assert set(cls.resolve_options({})) <= set(cls.OPTIONS), name
