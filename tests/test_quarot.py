import pytest
import torch

from dllmq.models.loading import load_model
from dllmq.models.tiny import write_tiny_dream, write_tiny_llada
from dllmq.models.variants import inject_outliers
from dllmq.quantization.quarot import apply_online, fuse_norms, remove_online, rotate_model

# non-power-of-two FFN widths: 192 = 12 * 16 (Paley I, q = 11), 296 = 148 * 2 (Paley II, q = 73)
VARIANTS = {
    "llada": (write_tiny_llada, {"mlp_hidden_size": 192}),
    "llada-bias": (write_tiny_llada, {"mlp_hidden_size": 192, "include_bias": True, "bias_for_layer_norm": True}),
    "dream-gqa": (write_tiny_dream, {"intermediate_size": 296}),  # 4 heads / 2 kv heads, qkv bias
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("quarot")
    out = {name: fn(root / name, seed=0, **kw) for name, (fn, kw) in VARIANTS.items()}
    out["llada-52"] = write_tiny_llada(root / "llada-52", seed=0, mlp_hidden_size=52)  # 52: no Hadamard here
    return out


def _ids(b=2, length=12):
    return torch.randint(0, 2000, (b, length), generator=torch.Generator().manual_seed(0))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fuse_norms_preserves_function(paths, name):
    model = load_model(paths[name], dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        fuse_norms(model)
        out = model(ids)
    assert _rel(out, ref) < 1e-5
    for mod in model.modules():
        if type(mod).__name__ == "RMSNorm":
            assert bool((mod.weight == 1).all())
            assert mod.bias is None or not bool(mod.bias.any())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rotation_preserves_function(paths, name):
    model = load_model(paths[name], dtype=torch.float32)
    arch = model.arch
    ids, mask = _ids(), torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding path too
    with torch.no_grad():
        ref, ref_m = model(ids), model(ids, mask)
        emb_before = model.get_submodule(arch.embed_name).weight.clone()
        online = rotate_model(model, seed=1)
        c = model.config
        downs = {f"{arch.blocks_path}.{i}.{arch.mlp_down}" for i in range(len(model.blocks))}
        outs = {f"{arch.blocks_path}.{i}.{arch.attn_out}" for i in range(len(model.blocks))}
        assert set(online) == downs | outs  # FFN down input, and QuaRot's cross-head Hadamard on o_proj's input
        assert all(online[n] == {"type": "hadamard", "size": c.intermediate_size, "location": "input"} for n in downs)
        assert all(online[n] == {"type": "hadamard_heads", "heads": c.num_heads, "head_dim": c.head_dim,
                                 "location": "input"} for n in outs)
        assert _rel(model(ids), ref) > 0.1  # the down projections need their online transform
        apply_online(model, online)
        out, out_m = model(ids), model(ids, mask)
        assert _rel(out, ref) < 1e-4 and _rel(out_m, ref_m) < 1e-4
        apply_online(model, online)  # re-installing replaces, never applies twice
        assert _rel(model(ids), ref) < 1e-4
        remove_online(model)
        assert _rel(model(ids), ref) > 0.1
    emb = model.get_submodule(arch.embed_name).weight
    assert not torch.allclose(emb, emb_before)
    torch.testing.assert_close(emb.norm(dim=1), emb_before.norm(dim=1), rtol=1e-5, atol=1e-6)  # orthogonal


def test_rotation_options_and_seed(paths):
    ids = _ids()
    model = load_model(paths["dream-gqa"], dtype=torch.float32)
    with torch.no_grad():
        ref = model(ids)
        assert rotate_model(model, seed=5, heads=False, online_down=False) == {}
        assert _rel(model(ids), ref) < 1e-4  # nothing online needed
    a = load_model(paths["llada"], dtype=torch.float32)
    b = load_model(paths["llada"], dtype=torch.float32)
    rotate_model(a, seed=0)
    rotate_model(b, seed=1)
    name = f"{a.arch.blocks_path}.0.q_proj.weight"
    assert not torch.allclose(a.get_parameter(name), b.get_parameter(name))


def test_unsupported_size_fails_before_touching_weights(paths):
    model = load_model(paths["llada-52"], dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="order 52"):
        rotate_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    online = rotate_model(model, online_down=False)  # residual + per-head/cross-head rotations still possible
    assert {v["type"] for v in online.values()} == {"hadamard_heads"}


def _outlier_ratio(model, ids, names):
    """max|x| / rms(x) of each named linear's input, measured after any online transform."""
    stats, hooks = {}, []
    for n in names:
        def hook(mod, args, n=n):
            x = args[0].float()
            stats[n] = (x.abs().max() / x.pow(2).mean().sqrt()).item()
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        out = model(ids)
    for h in hooks:
        h.remove()
    return stats, out


@pytest.mark.parametrize("name", ["llada", "dream-gqa"])
def test_rotation_removes_injected_outliers(paths, name):
    model = load_model(paths[name], dtype=torch.float32)
    arch, ids = model.arch, _ids(length=16)
    with torch.no_grad():
        ref = model(ids)
    inject_outliers(model)  # function-preserving: 64x channels at the down-proj and attention inputs
    n_blocks = len(model.blocks)
    downs = [f"{arch.blocks_path}.{i}.{arch.mlp_down}" for i in range(n_blocks)]
    q_in = [f"{arch.blocks_path}.{i}.{arch.block_linears[0]}" for i in range(n_blocks)]
    before, out0 = _outlier_ratio(model, ids, downs + q_in)
    assert _rel(out0, ref) < 1e-5
    apply_online(model, rotate_model(model))
    after, out1 = _outlier_ratio(model, ids, downs + q_in)
    assert _rel(out1, ref) < 1e-4
    for n in downs + q_in:
        assert before[n] > 8.0, (n, before[n])
        assert after[n] < 5.0 and after[n] < before[n] / 2, (n, before[n], after[n])
