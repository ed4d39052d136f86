"""Fast decoding: window forwards over a KV cache, and the cached / parallel sampler."""

import pytest
import torch

from dllmq.diffusion.cache import _window_forward, fast_generate, kv_cache
from dllmq.diffusion.generation import GenerationConfig, generate_ids
from dllmq.diffusion.sampling import llada_generate
from dllmq.models.loading import load_model


@pytest.fixture(params=["tiny_llada", "tiny_dream"])
def model(request):
    m = load_model(request.getfixturevalue(request.param), dtype=torch.float32)
    return m.eval()


def _inputs(m, lp=6, gen=16, b=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 200, (b, lp + gen), generator=g)
    x[:, lp + 4:] = m.mask_token_id
    am = torch.ones(b, lp + gen, dtype=torch.long)
    am[1, :2] = 0  # left padding on the second row
    return x, am


@torch.no_grad()
@pytest.mark.parametrize("start,end", [(6, 14), (10, 22), (0, 8)])
def test_window_on_a_fresh_cache_equals_the_full_forward(model, start, end):
    """Keys/values spliced from the cache + rotary offsets + Dream's shift: exact when nothing changed."""
    x, am = _inputs(model)
    full = model.aligned_logits(x, am)
    with kv_cache(model) as kv:
        model.aligned_logits(x, am)  # fills the cache
        win = _window_forward(model, x, am, kv, start, end)
    torch.testing.assert_close(win, full[:, start:end], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_window_sees_new_tokens_only_inside_it(model):
    x, am = _inputs(model)
    with kv_cache(model) as kv:
        model.aligned_logits(x, am)
        y = x.clone()
        y[:, 10] = 42  # inside the window: visible
        a = _window_forward(model, y, am, kv, 8, 16)
        y2 = y.clone()
        y2[:, 20] = 43  # outside the window: the cache still holds the old keys/values
        b = _window_forward(model, y2, am, kv, 8, 16)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model.aligned_logits(x, am)[:, 8:16], atol=1e-5)


def test_uncached_fixed_schedule_equals_llada_sampler(tiny_llada):
    m = load_model(tiny_llada, dtype=torch.float32).eval()
    p = torch.randint(10, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = llada_generate(m.aligned_logits, p, m.mask_token_id, steps=8, gen_length=16, block_length=8)
    out = fast_generate(m, p, steps=8, gen_length=16, block_length=8, cache="none", threshold=None)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_threshold_decoding_fills_every_mask_in_fewer_forwards(model, cache):
    p = torch.randint(10, 200, (2, 5), generator=torch.Generator().manual_seed(2))
    out = fast_generate(model, p, gen_length=16, block_length=8, cache=cache, threshold=0.0)
    assert not (out == model.mask_token_id).any() and torch.equal(out[:, :5], p)
    # threshold 0 commits every masked token of a block at once: one forward per block
    assert fast_generate.last_forwards == 2
    out = fast_generate(model, p, gen_length=16, block_length=8, cache=cache, threshold=1.01)  # one per step
    assert fast_generate.last_forwards == 16 and not (out == model.mask_token_id).any()


def test_generation_config_routes_to_fast(tiny_llada):
    m = load_model(tiny_llada, dtype=torch.float32).eval()
    p = torch.randint(10, 200, (1, 5), generator=torch.Generator().manual_seed(3))
    cfg = GenerationConfig.fast_defaults(steps=16, gen_length=16, block_length=8)
    assert cfg.cache == "dual" and cfg.threshold == 0.9
    out = generate_ids(m, p, None, cfg)
    assert out.shape == (1, 21) and not (out == m.mask_token_id).any()
    with pytest.raises(ValueError, match="greedy"):
        generate_ids(m, p, None, GenerationConfig(cache="dual", temperature=0.5))
