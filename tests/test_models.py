import json

import pytest
import torch

from dllmq.errors import UserError
from dllmq.models.loading import ShardReader, load_model, load_tokenizer, resolve_model_path
from dllmq.models.registry import arch_for, supported_model_types


def _ids(n=12, vocab=200, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
def test_published_layout_loads(fixture, request):
    path = request.getfixturevalue(fixture)
    cfg = json.loads((path / "config.json").read_text())
    assert "auto_map" in cfg  # remote-code pointer present, yet we load natively
    model = load_model(path, dtype=torch.float32)
    reader = ShardReader(path)
    assert len(set(reader.map.values())) == 2  # sharded
    assert set(model.state_dict()) == set(reader.map)  # exactly the published tensor names


def test_llada_names_and_head_collision(tiny_llada):
    model = load_model(tiny_llada, dtype=torch.float32)
    names = set(model.state_dict())
    assert "model.transformer.ff_out.weight" in names  # LM head
    assert "model.transformer.blocks.0.ff_out.weight" in names  # down projection
    assert "model.transformer.blocks.1.attn_out.weight" in names
    assert model.arch.head_name == "model.transformer.ff_out"
    assert model.mask_token_id == 126336
    assert not model.arch.logits_shifted


def test_dream_names_bias_gqa(tiny_dream):
    model = load_model(tiny_dream, dtype=torch.float32)
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.bias" in sd and "lm_head.weight" in sd
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape[0] == 2 * 16  # 2 kv heads x head_dim 16
    assert model.mask_token_id == 151666 and model.arch.logits_shifted


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
def test_bidirectional(fixture, request):
    """Changing the last token must change the first position's logits (no causal mask)."""
    model = load_model(request.getfixturevalue(fixture), dtype=torch.float32)
    x = _ids()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 200
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4


def test_dream_aligned_logits_shift(tiny_dream):
    model = load_model(tiny_dream, dtype=torch.float32)
    x = _ids()
    with torch.no_grad():
        raw, al = model(x), model.aligned_logits(x)
    assert torch.equal(al[:, 1:], raw[:, :-1]) and torch.equal(al[:, 0], raw[:, 0])


def test_padding_is_masked_out(tiny_llada):
    """With left padding, real tokens' logits must not depend on what the pad positions hold."""
    model = load_model(tiny_llada, dtype=torch.float32)
    x = _ids()
    mask = torch.ones_like(x)
    mask[:, :3] = 0
    y = x.clone()
    y[:, :3] = 7
    with torch.no_grad():
        a, b = model(x, mask), model(y, mask)
    assert torch.allclose(a[:, 3:], b[:, 3:], atol=1e-5)


def test_block_pieces_compose_to_forward(tiny_llada):
    model = load_model(tiny_llada, dtype=torch.float32)
    x = _ids()
    with torch.no_grad():
        ctx = model.block_context(x)
        h = model.embed(x)
        for blk in model.blocks:
            h = blk(h, **ctx)
        assert torch.allclose(model.head(h), model(x))
    assert model.linear_names()[6] == "model.transformer.blocks.0.ff_out"


def test_rmsnorm_and_rope_in_fp32(tiny_llada):
    """bf16 forward stays close to fp32 (norm and RoPE are computed in fp32)."""
    m32 = load_model(tiny_llada, dtype=torch.float32)
    m16 = load_model(tiny_llada, dtype=torch.bfloat16)
    x = _ids()
    with torch.no_grad():
        a, b = m32(x), m16(x).float()
    assert (a - b).abs().max() / a.abs().max() < 0.05


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
def test_tokenizer_loads_silently_with_auto_map(fixture, request, capsys):
    path = request.getfixturevalue(fixture)
    tok = load_tokenizer(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in text
    cap = capsys.readouterr()
    assert "trust_remote_code" not in cap.out + cap.err


def test_llada_chat_template_exact(tiny_llada):
    tok = load_tokenizer(tiny_llada)
    s = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert s == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(s, add_special_tokens=False).input_ids
    assert ids[:2] == [126080, 126346] and tok.mask_token_id == 126336


def test_registry_rejects_unknown():
    assert {"llada", "Dream"} <= set(supported_model_types())
    with pytest.raises(UserError, match="supported: .*llada"):
        arch_for({"model_type": "gpt2"})


def test_missing_and_corrupt(tmp_path, tiny_llada):
    with pytest.raises(UserError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llada, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="safetensors"):
        load_model(broken)
    (broken / "model.safetensors.index.json").unlink()
    for f in broken.glob("model-*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="no safetensors"):
        load_model(broken)


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import importlib

    import huggingface_hub.constants as c

    importlib.reload(c)
    with pytest.raises(UserError, match="offline|cannot download"):
        resolve_model_path("GSAI-ML/LLaDA-8B-Instruct")


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
def test_outlier_injection_preserves_function(fixture, request, tmp_path):
    from dllmq.evaluation.outliers import activation_stats
    from dllmq.models.loading import outlier_variant

    src = request.getfixturevalue(fixture)
    out = outlier_variant(src, tmp_path / "outl", factor=64.0, channels=2)
    a, b = load_model(src, dtype=torch.float32), load_model(out, dtype=torch.float32)
    x = _ids(16)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() / ya.abs().max() < 1e-4
    down = a.arch.mlp_down
    sa = {s.name: s for s in activation_stats(a, [x])}
    sb = {s.name: s for s in activation_stats(b, [x])}
    name = f"{a.arch.blocks_path}.0.{down}"
    assert sb[name].max_abs > 3 * sa[name].max_abs
    assert sb[name].channel_ratio > 4 * sa[name].channel_ratio
    assert sb[name].kurtosis > 10 * sa[name].kurtosis
    assert sb[name].outlier_token_share > sa[name].outlier_token_share + 0.2  # spread over many tokens
