"""The method registry: a method registered from outside the package (here, the test suite) runs end to end,
quantize -> checkpoint -> load -> forward / generate, through the Python verb and a recipe, and its name and label
reach every place that lists methods."""

from __future__ import annotations

import json

import pytest
import torch

import dllmq
from dllmq.quantization.methods import METHODS, Method, get_method, label_of, register_method


class HalfClipRTN(Method):
    """Round-to-nearest with every group's range clipped to 90 %: a toy, but a real method."""

    name = "toy-clip-rtn"
    label = "Toy clipped RTN"
    rewrites_weights = False

    def quantize_linear(self, name, weight, stats=None):
        return self.round_weight(name, weight.float(), stats, clip_ratio=0.9)


@pytest.fixture
def toy():
    register_method(HalfClipRTN)
    yield HalfClipRTN
    METHODS.pop(HalfClipRTN.name)  # leave the registry as the package defines it


def test_builtin_methods_are_registered_in_cli_order():
    assert list(METHODS)[:6] == ["rtn", "gptq", "awq", "smoothquant", "quarot", "duquant"]
    assert label_of("rtn").startswith("RTN") and label_of("nonesuch") == "nonesuch"


def test_register_refuses_bad_classes():
    with pytest.raises(TypeError):
        register_method(int)

    class Nameless(Method):
        pass

    with pytest.raises(TypeError):
        register_method(Nameless)

    class Clash(Method):
        name = "rtn"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)


def test_registered_toy_method_runs_end_to_end(toy, tmp_path):
    assert get_method("toy-clip-rtn") is toy and label_of("toy-clip-rtn") == "Toy clipped RTN"
    res = dllmq.quantize("tiny", {"method": "toy-clip-rtn", "weights": {"bits": 4, "group_size": 32},
                                  "calibration": {"mask": "none", "samples": 2}}, out=tmp_path / "toy", device="cpu")
    qc = json.loads((tmp_path / "toy" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "toy-clip-rtn" and res.recipe.method == "toy-clip-rtn"
    # the clip is real: codes differ from plain RTN's on the same weights
    plain = dllmq.quantize("tiny", {"method": "rtn", "weights": {"bits": 4, "group_size": 32}},
                           out=tmp_path / "rtn", device="cpu")
    assert plain.layers and len(res.layers) == len(plain.layers)
    assert sum(a.rel_error for a in res.layers) != sum(b.rel_error for b in plain.layers)

    m = dllmq.load(tmp_path / "toy")
    fp = dllmq.load("tiny", dtype=torch.float32)
    x = torch.randint(10, 500, (1, 24))
    with torch.no_grad():
        a, b = m.aligned_logits(x).float(), fp.aligned_logits(x).float()
    assert torch.isfinite(a).all()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.5  # a working 4-bit model, not noise
    assert isinstance(m.generate("What is 2 + 3?", gen_length=8, steps=8, block_length=8), str)


def test_unknown_method_lists_the_registry(toy):
    from dllmq.errors import UserError

    with pytest.raises(UserError, match="toy-clip-rtn"):
        get_method("nonesuch")
