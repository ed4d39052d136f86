"""The plain AR `llama` family: same layout and logits as transformers' LlamaForCausalLM, causal attention,
and `dllmq quantize --method gptq --calib-mask none` works on it."""

import json

import pytest
import torch

from cli_helpers import run_cli
from dllmq.models.loading import load_model


def _write_llama(path, attention_bias: bool, tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dllmq.data.tokenizer import train_tokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, attention_bias=attention_bias,
                      tie_word_embeddings=tie, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows up
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    texts = [f"def f{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(200)]
    train_tokenizer(texts, path, vocab_size=320)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = _write_llama(path, attention_bias=False)
    return path, model


@pytest.mark.parametrize("attention_bias,tie", [(False, False), (True, False), (False, True)])
def test_logits_match_transformers(tmp_path, attention_bias, tie):
    hf = _write_llama(tmp_path / "m", attention_bias, tie)
    ours = load_model(tmp_path / "m", dtype=torch.float32)
    assert ours.arch.family == "llama" and ours.arch.logits_shifted
    assert set(ours.state_dict()) <= set(hf.state_dict())
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        got = ours(x)
    assert (got - ref).abs().max() < 1e-4
    # right padding: real positions are unaffected by the pads (causal + key mask combined)
    am = torch.ones_like(x)
    am[1, 16:] = 0
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=am).logits
        got = ours(x, am)
    assert torch.isfinite(got).all()
    assert (got[0] - ref[0]).abs().max() < 1e-4 and (got[1, :16] - ref[1, :16]).abs().max() < 1e-4


def test_causal_and_sentinel(llama_dir):
    path, _ = llama_dir
    model = load_model(path, dtype=torch.float32)
    assert model.mask_token_id == 319  # sentinel: vocab_size - 1
    assert all(b.self_attn.sdpa.is_causal for b in model.blocks)
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 320
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[:, :-1] - b[:, :-1]).abs().max() == 0  # earlier positions never see the last token
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


def test_diffusion_families_stay_bidirectional(tiny_dream, tiny_llada):
    for path in (tiny_dream, tiny_llada):
        model = load_model(path, dtype=torch.float32)
        assert not any(b.get_submodule(model.arch.attn_core).is_causal for b in model.blocks)


def test_cli_gptq_quantize(llama_dir, tmp_path, capsys):
    import dllmq
    from dllmq.runtime.qlinear import QuantLinear

    path, hf = llama_dir
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"def g{i}(a, b):\n    return a + b * {i}\n" * 3}) + "\n"
                             for i in range(8)))
    out = tmp_path / "q"
    code, stdout, err = run_cli(["quantize", path, "--method", "gptq", "--calib-mask", "none", "--calib", calib,
                                 "--calib-samples", "8", "--calib-seq-len", "32", "--group-size", "32", "--out", out,
                                 "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["layers"] == 2 * 7 and summary["calibration"]["mode"] == "none"
    assert all(r["error_kind"] == "output" for r in summary["per_layer"])
    q = dllmq.load(out, dtype=torch.float32)
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
    x = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = hf(input_ids=x).logits, q(x)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.5
