"""The registry's round-trip contract: every registered method quantizes a LLaDA and a Dream checkpoint through the
Python verb, and `dllmq.load` rebuilds it with real quantized layers that compute what the method meant.

Runs over `METHODS`, so a method added later is covered without touching this file. At 8 bits every method must be
near-lossless after save -> load (a wrong packing order, a transform not reinstalled or a scale in the wrong layout
shows up as a large logit error); at 4 bits the checkpoint must hold 4-bit codes and lose more than at 8 bits."""

from __future__ import annotations

import json

import pytest
import torch

import dllmq
from dllmq.quantization.methods import METHODS
from dllmq.runtime.qlinear import QuantLinear

FAMILIES = ["tiny_llada", "tiny_dream"]
BUILTIN = ["rtn", "gptq", "awq", "smoothquant", "quarot", "duquant"]
FAST = {"duquant": {"steps": 16}}  # greedy rotation steps: the default 256 only costs time on tiny layers


def _recipe(method: str, bits: int) -> dict:
    cls = METHODS[method]
    recipe = {"method": method, "weights": {"bits": bits, "group_size": -1 if cls.quantizes_activations else 32},
              "calibration": {"mask": "random", "samples": 4, "seq_len": 32}, "options": FAST.get(method, {})}
    if cls.quantizes_activations:
        recipe["activations"] = {"bits": 8}
    return recipe


def _logits(model, x):
    with torch.no_grad():
        return model(x).float()


@pytest.fixture(scope="module")
def reference(request):
    """Full-precision logits per family, computed once."""
    cache = {}

    def get(family, path):
        if family not in cache:
            x = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
            cache[family] = (x, _logits(dllmq.load(path, dtype=torch.float32), x))
        return cache[family]

    return get


def test_the_contract_covers_every_builtin_method():
    assert set(BUILTIN) <= set(METHODS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_round_trips_through_save_and_load(method, family, request, reference, tmp_path):
    src = request.getfixturevalue(family)
    x, fp = reference(family, src)
    errors = {}
    for bits in (8, 4):
        out = tmp_path / f"w{bits}"
        res = dllmq.quantize(src, _recipe(method, bits), out=out, device="cpu")
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["method"] == method and qc["weights"]["num_bits"] == bits

        model = dllmq.load(out, dtype=torch.float32)
        qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert len(qls) == len(res.layers) > 0  # every quantized layer is rebuilt as a real quantized linear
        assert {m.spec.num_bits for m in qls.values()} == {bits}
        if METHODS[method].quantizes_activations:
            assert {m.act_spec.num_bits for m in qls.values()} == {8}
        q = _logits(model, x)
        assert torch.isfinite(q).all()
        errors[bits] = float((q - fp).norm() / fp.norm())
    assert errors[8] < 0.05, errors  # near-lossless: the checkpoint computes what the method quantized
    assert errors[8] < errors[4] < 1.0, errors  # 4-bit codes are really 4-bit, and still a working model
