"""Recipes (issue 15): one typed config for `dllmq quantize --recipe` and `dllmq.quantize`, recorded in the
checkpoint; `dllmq.load(...).generate`."""

import json

import pytest
from safetensors.torch import load_file

import dllmq
from cli_helpers import run_cli
from dllmq.errors import UserError
from dllmq.recipe import CLI_FIELDS, Recipe, recipe_of

# GPTQ on block 0 only, clean calibration text: calibration and method options are exercised, cheaply
RECIPE = """\
method: gptq
weights: {bits: 4, group_size: 32, symmetric: true}
calibration: {mask: none, samples: 4, seq_len: 32}
options: {damp: 0.02, scale_search: minmax}
ignore: ['model\\.transformer\\.blocks\\.[1-9]\\..*']
"""


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_cli_and_python_write_identical_tensors(tmp_path, capsys):
    rfile = tmp_path / "recipe.yaml"
    rfile.write_text(RECIPE)
    # an explicit flag overrides the file's field (samples 4 -> 2); the Python override does the same
    code, out, err = run_cli(["quantize", "tiny", "--recipe", rfile, "--calib-samples", "2", "--out",
                              tmp_path / "cli", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["layers"] == 7  # block 0 only
    res = dllmq.quantize("tiny", rfile, out=tmp_path / "py", calibration__samples=2)
    a, b = _tensors(tmp_path / "cli"), _tensors(tmp_path / "py")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # the checkpoint records the full resolved recipe, method defaults included
    qc_cli = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    qc_py = json.loads((tmp_path / "py" / "config.json").read_text())["quantization_config"]
    assert qc_cli["recipe"] == qc_py["recipe"] == res.recipe.to_dict()
    rec = recipe_of(tmp_path / "cli")
    assert rec.calibration.samples == 2 and rec.options["damp"] == 0.02 and rec.options["act_order"] is False
    assert rec.weights.group_size == 32 and rec.activations.bits == 16

    # ... and `dllmq info --recipe` prints it as a file that reproduces the run (resolving it again changes nothing)
    code, printed, err = run_cli(["info", tmp_path / "cli", "--recipe"], capsys)
    assert code == 0, err
    assert printed == rec.to_yaml()
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert Recipe.from_file(again).resolve() == rec

    # a checkpoint written before recipes were recorded: rebuilt from its quantization config
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    del cfg["quantization_config"]["recipe"]
    (old / "config.json").write_text(json.dumps(cfg))
    rebuilt = recipe_of(old)
    assert (rebuilt.method, rebuilt.weights, rebuilt.options, rebuilt.ignore) == \
        (rec.method, rec.weights, rec.options, rec.ignore)

    # the loaded checkpoint generates text with its tokenizer: str -> str, list -> list
    m = dllmq.load(tmp_path / "py")
    assert isinstance(m.generate("What is 12 + 30?", gen_length=16, steps=8, block_length=16), str)
    two = m.generate(["Hi", "What is 2 + 2?"], gen_length=16, steps=8, block_length=16, cache="dual", threshold=0.9)
    assert isinstance(two, list) and len(two) == 2 and all(isinstance(t, str) for t in two)


@pytest.mark.parametrize("text,field", [
    ("method: rtn\nweights: {bitz: 4}\n", "weights.bitz"),
    ("method: rtn\nfoo: 1\n", "foo"),
    ("calibration: {tmas: {stepz: 3}}\n", "calibration.tmas.stepz"),
    ("method: gptq\noptions: {dampp: 0.1}\n", "dampp"),
    ("method: rtn\noptions: {damp: 0.1}\n", "options.damp"),
    ("weights: {bits: '4'}\n", "weights.bits"),
    ("method: gptq\noptions: {cgq: 'yes'}\n", "options.cgq"),
])
def test_bad_recipe_one_line_exit_2(text, field, tmp_path, capsys):
    rfile = tmp_path / "r.yaml"
    rfile.write_text(text)
    code, out, err = run_cli(["quantize", "tiny", "--recipe", rfile, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert field in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        dllmq.quantize("tiny", rfile, out=tmp_path / "o")


def test_recipe_inputs_and_overrides(tmp_path):
    d = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "activations": {"bits": 8},
         "calibration": {"mask": "none", "samples": 8}, "options": {"damp": 0.01}}
    (tmp_path / "r.json").write_text(json.dumps(d))
    r = Recipe.from_dict(d)
    assert Recipe.coerce(tmp_path / "r.json") == r == Recipe.coerce(str(tmp_path / "r.json")) == Recipe.coerce(r)
    res = r.resolve()
    assert res.weights.symmetric is True and res.activations.kv_bits == 16 and res.options["scale_search"] == "mse"
    o = r.override({"weights.bits": 8, "options": {"act_order": True}}, calibration__samples=3)
    assert (o.weights.bits, o.weights.group_size, o.calibration.samples) == (8, 32, 3)
    assert o.options == {"damp": 0.01, "act_order": True}
    with pytest.raises(UserError, match="weights.bitz"):
        r.override(weights__bitz=3)
    with pytest.raises(UserError, match="activations.bits"):  # weight-activation method without activation bits
        Recipe(method="smoothquant").resolve()
    with pytest.raises(UserError, match="is not valid YAML"):
        (tmp_path / "bad.yaml").write_text("method: [gptq\n")
        Recipe.from_file(tmp_path / "bad.yaml")
    assert {"load", "quantize", "Recipe"} <= set(dllmq.__all__)


def test_cli_defaults_are_the_recipe_defaults():
    """Flags left at their defaults are not applied onto a recipe: both must mean the same run."""
    from dllmq.cli.quantize import quantize

    import inspect

    defaults = Recipe().to_dict()
    for name, p in inspect.signature(quantize).parameters.items():
        if name not in CLI_FIELDS:
            continue
        d = getattr(p.default, "default", p.default)
        node = defaults
        for part in CLI_FIELDS[name].split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if name == "tmas_proportions":
            d = [float(x) for x in d.split(",")]
        if name == "ignore":
            d = list(d)
        assert node == d or (node is None and CLI_FIELDS[name].startswith("options.")), (name, node, d)
