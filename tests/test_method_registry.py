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


# -- a method that brings a new kind of online transform: its module class plus its adapter, nothing else --------

from torch import nn  # noqa: E402

from dllmq.runtime import transforms as online  # noqa: E402


class OnlineSignFlip(nn.Module):
    """x -> x * signs: the online half of a sign flip folded into the weight's input columns."""

    kind, label = "toy_sign_flip", "online sign flips (toy)"

    @classmethod
    def from_spec(cls, spec, tensors):
        return cls(tensors["signs"])

    def __init__(self, signs):
        super().__init__()
        self.register_buffer("signs", signs)

    def forward(self, x):
        return x * self.signs.to(x.dtype)


class SignFlipRTN(Method):
    """Flips the sign of the input channels of every attention output projection (W' = W diag(s), x' = x s):
    exact in full precision, so the checkpoint only works if the loader installs the online half."""

    name = "toy-sign-flip"
    label = "Toy sign-flip RTN"

    def transform_block(self, block, ctx):
        name = ctx.arch.attn_out
        lin = block.get_submodule(name)
        g = torch.Generator().manual_seed(ctx.index)
        signs = torch.randint(0, 2, (lin.weight.shape[1],), generator=g).float() * 2 - 1
        lin.weight.data.mul_(signs.to(lin.weight.dtype)[None, :])
        spec = ({"type": OnlineSignFlip.kind}, {"signs": signs})
        ctx.install(name, *spec)
        return {name: spec}


@pytest.fixture
def sign_flip():
    online.register_transform(OnlineSignFlip)
    register_method(SignFlipRTN)
    yield
    METHODS.pop(SignFlipRTN.name)
    online.TRANSFORMS.pop(OnlineSignFlip.kind)


def test_register_transform_refuses_bad_classes():
    with pytest.raises(TypeError):
        online.register_transform(int)

    class NoKind(nn.Module):
        pass

    with pytest.raises(TypeError, match="kind"):
        online.register_transform(NoKind)

    class Clash(OnlineSignFlip):
        kind = "hadamard"

    with pytest.raises(ValueError, match="already registered"):
        online.register_transform(Clash)
    assert set(online.TRANSFORMS) >= {"hadamard", "hadamard_heads", "duquant", "scale"}


def test_new_transform_kind_runs_end_to_end_and_is_named_everywhere(sign_flip, tmp_path):
    from dllmq.checkpoint.export_ct import check_exportable
    from dllmq.errors import UserError
    from dllmq.hub.card import build_card
    from dllmq.hub.push import validate_checkpoint

    dllmq.quantize("tiny", {"method": "toy-sign-flip", "weights": {"bits": 8, "group_size": 32}},
                   out=tmp_path / "flip", device="cpu")
    qc = json.loads((tmp_path / "flip" / "config.json").read_text())["quantization_config"]
    kinds = {spec["type"] for spec in qc["transforms"].values()}
    assert kinds == {"toy_sign_flip"} and len(qc["transforms"]) == 8  # one per block of the bundled model

    m = dllmq.load(tmp_path / "flip")
    installed = [mod for mod in m.modules() if isinstance(mod, OnlineSignFlip)]
    assert len(installed) == 8
    fp = dllmq.load("tiny", dtype=torch.float32)
    x = torch.randint(10, 500, (1, 24))
    with torch.no_grad():
        a, b = m.aligned_logits(x).float(), fp.aligned_logits(x).float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9  # W8 with the flips undone online
    for mod in installed:  # without the online half the folded weights are wrong: the transform does real work
        mod.signs.fill_(1.0)
    with torch.no_grad():
        broken = m.aligned_logits(x).float()
    assert (broken - b).abs().mean() > 2 * (a - b).abs().mean()

    ckpt = validate_checkpoint(tmp_path / "flip")
    with pytest.raises(UserError, match="online sign flips \\(toy\\) on 8 layers"):
        check_exportable(ckpt.qcfg, tmp_path / "flip")
    card = str(build_card(ckpt, "someone/flip"))
    assert "online sign flips (toy) on 8 layers" in card and "Toy sign-flip RTN" in card


def test_unknown_transform_kind_is_refused_with_the_known_ones():
    from dllmq.errors import UserError

    with pytest.raises(UserError, match="unknown online transform 'nonesuch'.*hadamard"):
        online.build({"type": "nonesuch"}, {})
