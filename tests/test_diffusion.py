"""Tests of the model-agnostic diffusion core (masking, likelihood, samplers) with fake logits functions."""

import pytest
import torch
import torch.nn.functional as F

from dllmq.diffusion.likelihood import masked_token_nll, mc_loglikelihood, mc_loglikelihood_batch
from dllmq.diffusion.masking import (
    cfg_combine,
    forward_process,
    guided_logits,
    mask_by_count,
    stratified_mask_counts,
)
from dllmq.diffusion.sampling import (
    _gumbel_argmax,
    decode_answer,
    dream_generate,
    llada_generate,
    num_transfer_tokens,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)

V = 32
MASK = V - 1  # mask id inside the vocab
EOS = 0


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def positional_fn(table, calls=None):
    """Logits depend only on the position (not on the input): logits[b, i] = table[i]."""

    def fn(ids, am):
        if calls is not None:
            calls.append((ids.clone(), None if am is None else am.clone()))
        b, l = ids.shape
        return table[:l][None].expand(b, -1, -1).clone()

    return fn


def target_fn(target, increasing=False, calls=None):
    """argmax at position i is target[i]; confidence decreases (or increases) with the position."""
    l = target.numel()
    conf = torch.linspace(1.0, 4.0, l) if increasing else torch.linspace(4.0, 1.0, l)
    table = torch.zeros(l, V)
    table[torch.arange(l), target] = conf
    return positional_fn(table, calls)


def random_table(l, seed=0):
    return torch.randn(l, V, generator=gen(seed)) * 2.0


# ----------------------------------------------------------------------------------------------------------------
# masking
# ----------------------------------------------------------------------------------------------------------------


def test_forward_process_rate_and_maskable():
    x = torch.randint(0, MASK, (4000, 40), generator=gen(1))
    noisy, masked, p = forward_process(x, MASK, t=0.3, eps=1e-3, generator=gen(2))
    expect = (1 - 1e-3) * 0.3 + 1e-3
    assert torch.allclose(p, torch.full_like(p, expect))
    assert abs(masked.float().mean().item() - expect) < 0.01
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK))
    assert torch.equal(noisy[~masked], x[~masked])

    # random t: p_mask in [eps, 1], constant per row, mean ~ 0.5; masking rate follows p_mask per row
    noisy, masked, p = forward_process(x, MASK, generator=gen(3))
    assert p.min() >= 1e-3 and p.max() <= 1.0
    assert torch.allclose(p, p[:, :1].expand_as(p))
    assert abs(p[:, 0].mean().item() - 0.5) < 0.03
    assert abs((masked.float().mean(1) - p[:, 0]).mean().item()) < 0.01

    # maskable: prompt never masked
    maskable = torch.zeros(40, dtype=torch.bool)
    maskable[25:] = True
    noisy, masked, _ = forward_process(x, MASK, t=torch.ones(4000), maskable=maskable, generator=gen(4))
    assert not masked[:, :25].any()
    assert masked[:, 25:].all()  # t = 1 -> p_mask = 1

    # determinism with a generator, and no use of the global RNG
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = forward_process(x[:5], MASK, generator=gen(7))[0]
    b = forward_process(x[:5], MASK, generator=gen(7))[0]
    assert torch.equal(a, b)
    assert torch.equal(before, torch.random.get_rng_state())


def test_stratified_counts():
    for L, b in [(16, 4), (7, 16), (1, 4), (100, 16)]:
        for seed in range(5):
            c = stratified_mask_counts(L, b, generator=gen(seed))
            assert c.shape == (b,) and c.dtype == torch.long
            assert c.min() >= 1 and c.max() <= L
    # b == L: a permutation of 1..L (k, k+1, ... wrapped)
    c = stratified_mask_counts(10, 10, generator=gen(3))
    assert sorted(c.tolist()) == list(range(1, 11))
    # b = 4, L = 16: spaced by L/b = 4 (mod L)
    c = stratified_mask_counts(16, 4, generator=gen(5))
    assert all(((c[i + 1] - c[i]) % 16).item() == 4 for i in range(3))
    # all k values are reachable
    seen = {int(stratified_mask_counts(5, 1, generator=gen(s))[0]) for s in range(200)}
    assert seen == {1, 2, 3, 4, 5}


def test_mask_by_count():
    x = torch.arange(20)
    maskable = torch.zeros(20, dtype=torch.bool)
    maskable[8:] = True
    counts = torch.tensor([1, 5, 12, 30])
    noisy, masked = mask_by_count(x, counts, MASK, maskable=maskable, generator=gen(0))
    assert noisy.shape == (4, 20)
    assert masked.sum(1).tolist() == [1, 5, 12, 12]  # clipped to the 12 maskable positions
    assert not masked[:, :8].any()
    assert torch.equal(noisy[masked], torch.full((int(masked.sum()),), MASK))
    # positions are random: over seeds each maskable position gets masked
    hits = torch.zeros(20)
    for s in range(100):
        hits += mask_by_count(x, torch.tensor([1]), MASK, maskable, gen(s))[1][0].float()
    assert (hits[8:] > 0).all() and hits[:8].sum() == 0


# ----------------------------------------------------------------------------------------------------------------
# likelihood
# ----------------------------------------------------------------------------------------------------------------


def test_one_token_elbo_is_exact():
    table = random_table(12)
    fn = positional_fn(table)
    prompt = torch.tensor([3, 4, 5, 6, 7])
    for a in [2, 9, 17]:
        exact = F.log_softmax(table[5], -1)[a].item()
        for mc, bs in [(1, 16), (16, 16), (32, 8)]:
            got = mc_loglikelihood(fn, prompt, torch.tensor([a]), MASK, mc_num=mc, batch_size=bs, generator=gen(1))
            assert got == pytest.approx(exact, abs=1e-5)


def test_multi_token_elbo_unbiased_for_positional_logits():
    # logits independent of the input: E[ELBO] = sum_i log p_i(a_i) exactly; MC average close to it
    table = random_table(20, seed=3)
    fn = positional_fn(table)
    prompt = torch.tensor([1, 2, 3, 4])
    ans = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    exact = sum(F.log_softmax(table[4 + i], -1)[a].item() for i, a in enumerate(ans.tolist()))
    got = mc_loglikelihood(fn, prompt, ans, MASK, mc_num=256, batch_size=16, generator=gen(0))
    assert got == pytest.approx(exact, rel=0.05)
    assert got <= 0


def test_mc_loglikelihood_ranks_correct_answer():
    target = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    fn = target_fn(target)
    prompt = target[:4]
    good = mc_loglikelihood(fn, prompt, target[4:], MASK, mc_num=32, batch_size=16, generator=gen(0))
    bad = mc_loglikelihood(fn, prompt, torch.tensor([20, 21, 22, 23, 24, 25]), MASK, mc_num=32, generator=gen(0))
    assert good > bad


def test_mc_loglikelihood_validation():
    fn = positional_fn(random_table(8))
    with pytest.raises(ValueError, match="multiple of batch_size"):
        mc_loglikelihood(fn, torch.tensor([1]), torch.tensor([2, 3]), MASK, mc_num=20, batch_size=16)
    with pytest.raises(ValueError):
        mc_loglikelihood(fn, torch.tensor([1]), torch.tensor([], dtype=torch.long), MASK, mc_num=1)
    # mc_num < batch_size is fine (batch capped): one forward with 4 rows
    calls = []
    mc_loglikelihood(positional_fn(random_table(8), calls), torch.tensor([1]), torch.tensor([2, 3]), MASK,
                     mc_num=4, batch_size=16, generator=gen(0))
    assert len(calls) == 1 and calls[0][0].shape == (4, 3) and calls[0][1] is None


def test_cfg_formula_and_cfg_likelihood():
    c_tab = random_table(6, seed=1)
    u_tab = random_table(6, seed=2)
    calls = []

    def fn(ids, am):
        calls.append(ids.clone())
        uncond = (ids[:, 0] == MASK)[:, None, None]
        return torch.where(uncond, u_tab[None], c_tab[None]).expand(ids.shape[0], -1, -1)

    x = torch.tensor([[1, 2, 3, MASK, MASK, MASK]])
    prompt_pos = x != MASK
    out = guided_logits(fn, x, None, prompt_pos, MASK, cfg_scale=1.5)
    assert torch.allclose(out[0], u_tab + 2.5 * (c_tab - u_tab))
    assert torch.allclose(cfg_combine(c_tab, u_tab, 1.5), u_tab + 2.5 * (c_tab - u_tab))
    assert calls[-1].shape == (2, 6) and (calls[-1][1, :3] == MASK).all() and torch.equal(calls[-1][0], x[0])
    # cfg_scale 0: plain forward
    assert torch.equal(guided_logits(fn, x, None, prompt_pos, MASK, 0.0)[0], c_tab)

    # one-token answer with CFG: exact guided log-prob
    got = mc_loglikelihood(fn, torch.tensor([1, 2, 3, 4, 5]), torch.tensor([7]), MASK, mc_num=2, batch_size=2,
                           cfg_scale=0.5, generator=gen(0))
    guided = u_tab[5] + 1.5 * (c_tab[5] - u_tab[5])
    assert got == pytest.approx(F.log_softmax(guided, -1)[7].item(), abs=1e-5)


def test_batch_likelihood_matches_sequential_and_pads():
    table = random_table(16, seed=5)
    calls = []
    fn = positional_fn(table, calls)
    pairs = [
        (torch.tensor([1, 2, 3]), torch.tensor([4, 5])),
        (torch.tensor([1, 2, 3, 4, 5, 6, 7]), torch.tensor([8, 9, 10, 11])),
        (torch.tensor([2]), torch.tensor([3])),
    ]
    g = gen(11)
    seq = [mc_loglikelihood(positional_fn(table), p, a, MASK, mc_num=8, batch_size=4, generator=g) for p, a in pairs]
    bat = mc_loglikelihood_batch(fn, pairs, MASK, pad_id=EOS, mc_num=8, batch_size=4, generator=gen(11), max_rows=6)
    assert bat == pytest.approx(seq, abs=1e-5)
    # padding: right-padded with pad_id and zeros in the attention mask
    padded = [(ids, am) for ids, am in calls if am is not None]
    assert padded, "rows of different lengths should share a forward"
    for ids, am in padded:
        assert ((am == 0) <= (ids == EOS)).all()  # padded positions hold pad_id
        assert (am.flip(1).cummax(1).values.flip(1) == am).all()  # zeros only on the right
    with pytest.raises(ValueError, match="pad_id"):
        mc_loglikelihood_batch(fn, pairs, MASK, pad_id=None, mc_num=8, batch_size=4, max_rows=10)


def test_masked_token_nll():
    table = random_table(10, seed=9)
    fn = positional_fn(table)
    ids = torch.randint(0, MASK, (3, 10), generator=gen(4))
    exact = -sum(F.log_softmax(table, -1)[torch.arange(10), ids[b]].sum().item() for b in range(3))
    total, n = masked_token_nll(fn, ids, MASK, mc_num=256, generator=gen(0), batch_size=64)
    assert n == 30
    assert total == pytest.approx(exact, rel=0.05)
    # padding is neither masked nor counted, and the attention mask reaches the logits function
    calls = []
    am = torch.ones(3, 10, dtype=torch.long)
    am[0, 7:] = 0
    total2, n2 = masked_token_nll(positional_fn(table, calls), ids, MASK, mc_num=4, generator=gen(0), attention_mask=am)
    assert n2 == 27
    for x, a in calls:
        assert a is not None
        assert not ((x == MASK) & (a == 0)).any()
    a1 = masked_token_nll(fn, ids, MASK, mc_num=4, generator=gen(5))
    a2 = masked_token_nll(fn, ids, MASK, mc_num=4, generator=gen(5))
    assert a1 == a2


# ----------------------------------------------------------------------------------------------------------------
# LLaDA sampler
# ----------------------------------------------------------------------------------------------------------------


def test_num_transfer_tokens_schedule():
    m = torch.ones(2, 10, dtype=torch.bool)
    m[1, 7:] = False
    s = num_transfer_tokens(m, 4)
    assert s.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]


@pytest.mark.parametrize("gen_length,block_length,steps", [(12, 12, 12), (12, 4, 6), (12, 3, 8), (10, 10, 4)])
def test_llada_reproduces_target_and_schedule(gen_length, block_length, steps):
    lp = 5
    target = torch.randint(1, MASK, (lp + gen_length,), generator=gen(2))
    prompt = target[:lp].repeat(2, 1)
    states = []
    out = llada_generate(target_fn(target), prompt, MASK, steps=steps, gen_length=gen_length,
                         block_length=block_length, on_step=states.append)
    assert out.shape == (2, lp + gen_length)
    assert not (out == MASK).any()
    assert torch.equal(out[0], target) and torch.equal(out[1], target)
    assert len(states) == steps
    assert [s["step"] for s in states] == list(range(steps))
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    for s in states:
        committed = s["transfer_index"].sum(1)
        sched = num_transfer_tokens(torch.ones(1, block_length, dtype=torch.bool), spb)[0]
        assert (committed == sched[s["block_step"]]).all()
        # commits only inside the current block, only at masked positions
        ti = s["transfer_index"]
        assert not ti[:, : s["block_start"]].any() and not ti[:, s["block_end"]:].any()
        assert (s["x_before"][ti] == MASK).all()
        assert torch.equal(s["x"][~ti], s["x_before"][~ti])
    ratios = [s["mask_ratio"] for s in states]
    assert ratios[0] == 1.0 and all(a > b for a, b in zip(ratios, ratios[1:]))


def test_llada_block_order_with_increasing_confidence():
    # confidence grows with the position: without blocks the last tokens would be committed first
    lp, gl, bl = 3, 12, 4
    target = torch.randint(1, MASK, (lp + gl,), generator=gen(3))
    states = []
    out = llada_generate(target_fn(target, increasing=True), target[:lp], MASK, steps=12, gen_length=gl,
                         block_length=bl, on_step=states.append)
    assert torch.equal(out[0], target)
    for s in states:
        after = s["x"][:, s["block_end"]:]
        assert (after == MASK).all(), "a token after the current block was committed"
        before = s["x_before"][:, lp: s["block_start"]]
        assert not (before == MASK).any(), "earlier blocks must be complete"
    # within a block, highest confidence first -> right to left inside each block
    first = states[0]["transfer_index"][0].nonzero().flatten().tolist()
    assert first == [lp + bl - 1]
    # single block: the last position first
    states = []
    llada_generate(target_fn(target, increasing=True), target[:lp], MASK, steps=12, gen_length=gl, block_length=gl,
                   on_step=states.append)
    assert states[0]["transfer_index"][0].nonzero().flatten().tolist() == [lp + gl - 1]


def test_llada_bad_arguments():
    fn = target_fn(torch.arange(1, 20))
    p = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="multiple of block_length"):
        llada_generate(fn, p, MASK, steps=8, gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="number of blocks"):
        llada_generate(fn, p, MASK, steps=5, gen_length=8, block_length=4)
    with pytest.raises(ValueError, match="remasking"):
        llada_generate(fn, p, MASK, steps=8, gen_length=8, block_length=8, remasking="foo")
    with pytest.raises(ValueError, match="eos_id"):
        llada_generate(fn, p, MASK, steps=8, gen_length=8, block_length=8, logits_eos_inf=True)


@pytest.mark.parametrize("remasking,temperature", [("random", 0.0), ("low_confidence", 1.0), ("random", 0.7)])
def test_llada_stochastic_fills_and_is_deterministic(remasking, temperature):
    table = random_table(24, seed=4)
    prompt = torch.randint(0, MASK, (3, 8), generator=gen(1))
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=temperature, remasking=remasking)
    torch.manual_seed(0)
    rng_before = torch.random.get_rng_state()
    a = llada_generate(positional_fn(table), prompt, MASK, generator=gen(5), **kw)
    b = llada_generate(positional_fn(table), prompt, MASK, generator=gen(5), **kw)
    c = llada_generate(positional_fn(table), prompt, MASK, generator=gen(6), **kw)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "global RNG used despite a generator"
    assert torch.equal(a, b)
    assert not (a == MASK).any()
    if temperature > 0:
        assert not torch.equal(a, c)


def test_gumbel_sampling_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).repeat(20000, 1)
    x = _gumbel_argmax(logits, 1.0, gen(0))
    freq = torch.bincount(x, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)
    # temperature sharpens: 0.5 -> p^2 normalised
    x = _gumbel_argmax(logits, 0.5, gen(1))
    freq = torch.bincount(x, minlength=3).float() / 20000
    p2 = torch.tensor([0.36, 0.09, 0.01]) / 0.46
    assert torch.allclose(freq, p2, atol=0.015)


def test_llada_eos_cfg_padding_history():
    lp, gl = 4, 8
    target = torch.randint(1, MASK, (lp + gl,), generator=gen(8))
    target[lp + 5] = EOS
    out = llada_generate(target_fn(target), target[:lp], MASK, steps=8, gen_length=gl, block_length=gl,
                         eos_id=EOS, logits_eos_inf=True)
    assert not (out[0, lp:] == EOS).any()
    assert torch.equal(out[0, lp:lp + 5], target[lp:lp + 5])

    # confidence_eos_eot_inf: EOS predicted positions are committed last
    states = []
    out = llada_generate(target_fn(target), target[:lp], MASK, steps=8, gen_length=gl, block_length=gl,
                         eos_id=EOS, confidence_eos_eot_inf=True, on_step=states.append)
    assert torch.equal(out[0], target)
    assert states[-1]["transfer_index"][0].nonzero().flatten().tolist() == [lp + 5]

    # left padding: the attention mask is extended with ones and reaches the logits function
    calls = []
    prompt = torch.stack([target[:lp], torch.cat([torch.tensor([EOS, EOS]), target[2:lp]])])
    am = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out, hist = llada_generate(target_fn(target, calls=calls), prompt, MASK, steps=4, gen_length=gl, block_length=4,
                               attention_mask=am, return_history=True)
    assert len(hist) == 4 and torch.equal(hist[-1], out)
    assert len(calls) == 4
    for ids, a in calls:
        assert torch.equal(a[:, :lp], am) and (a[:, lp:] == 1).all()

    # CFG: doubled batch with the prompt masked in the second half; logits follow the formula
    calls, states = [], []

    def fn(ids, a):
        calls.append((ids.clone(), a))
        base = target_fn(target)(ids, a)
        uncond = (ids[:, 0] == MASK)[:, None, None]
        return torch.where(uncond, base * 0.5, base)

    llada_generate(fn, prompt, MASK, steps=4, gen_length=gl, block_length=8, cfg_scale=2.0, attention_mask=am,
                   on_step=states.append)
    ids, a = calls[0]
    assert ids.shape[0] == 4 and a.shape[0] == 4
    assert (ids[2:, :lp] == MASK).all() and torch.equal(ids[:2, :lp], prompt)
    base = target_fn(target)(ids[:2], None)
    assert torch.allclose(states[0]["logits"], 0.5 * base + 3.0 * (base - 0.5 * base))
    # CFG without attention mask works (the reference raised NameError there)
    llada_generate(fn, prompt, MASK, steps=4, gen_length=gl, block_length=8, cfg_scale=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Dream sampler
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_dream_greedy_fills_and_matches_target(alg):
    lp, n = 5, 12
    target = torch.randint(1, MASK, (lp + n,), generator=gen(12))
    states = []
    out = dream_generate(target_fn(target), target[:lp].repeat(2, 1), MASK, max_new_tokens=n, steps=6, alg=alg,
                         generator=gen(0), on_step=states.append)
    assert out.shape == (2, lp + n)
    assert not (out == MASK).any()
    assert torch.equal(out[0], target) and torch.equal(out[1], target)
    assert len(states) == 6
    ratios = [s["mask_ratio"] for s in states]
    assert ratios[0] == 1.0 and all(a >= b for a, b in zip(ratios, ratios[1:]))
    if alg != "origin":
        ts = torch.linspace(1.0, 1e-3, 7)
        masked = n
        for i, s in enumerate(states):
            expect = masked if i == 5 else int(masked * (1 - ts[i + 1] / ts[i]).item())
            assert (s["transfer_index"].sum(1) == expect).all()
            masked -= expect


@pytest.mark.parametrize("alg,alg_temp", [("origin", 0.0), ("maskgit_plus", 0.0), ("topk_margin", 0.5),
                                          ("entropy", 1.0), ("maskgit_plus", 2.0)])
def test_dream_sampling_deterministic(alg, alg_temp):
    table = random_table(20, seed=6)
    prompt = torch.randint(0, MASK, (3, 6), generator=gen(2))
    kw = dict(max_new_tokens=14, steps=7, temperature=0.8, top_p=0.9, top_k=10, alg=alg, alg_temp=alg_temp)
    torch.manual_seed(0)
    rng_before = torch.random.get_rng_state()
    a = dream_generate(positional_fn(table), prompt, MASK, generator=gen(3), **kw)
    b = dream_generate(positional_fn(table), prompt, MASK, generator=gen(3), **kw)
    c = dream_generate(positional_fn(table), prompt, MASK, generator=gen(4), **kw)
    assert torch.equal(rng_before, torch.random.get_rng_state())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not (a == MASK).any()
    assert torch.equal(a[:, :6], prompt)


def test_dream_bad_arguments_and_padding():
    target = torch.arange(1, 20)
    with pytest.raises(ValueError, match="alg"):
        dream_generate(target_fn(target), target[:3], MASK, max_new_tokens=4, steps=4, alg="foo")
    calls = []
    am = torch.tensor([[0, 1, 1]])
    dream_generate(target_fn(target, calls=calls), target[:3][None], MASK, max_new_tokens=4, steps=2,
                   attention_mask=am)
    assert len(calls) == 2 and torch.equal(calls[0][1], torch.tensor([[0, 1, 1, 1, 1, 1, 1]]))


def test_sample_tokens_and_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all() and torch.isfinite(top_k_filter(logits, 2)[0, :2]).all()
    f = top_p_filter(logits, 0.7)  # 0.5 < 0.7 -> keep 0.3 as well; 0.8 >= 0.7 -> drop the rest
    assert torch.isfinite(f[0, :2]).all() and torch.isinf(f[0, 2:]).all()
    f = top_p_filter(logits, 0.4)  # top-1 always kept
    assert torch.isfinite(f[0, 0]) and torch.isinf(f[0, 1:]).all()
    conf, x0 = sample_tokens(logits)
    assert x0.item() == 0 and conf.item() == pytest.approx(0.5)
    conf, _ = sample_tokens(logits, confidence="margin")
    assert conf.item() == pytest.approx(0.2)
    conf, _ = sample_tokens(logits, confidence="neg_entropy")
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert conf.item() == pytest.approx((p * p.log()).sum().item(), abs=1e-5)
    # top-p renormalises: prob confidence of the argmax is 0.5 / 0.8
    conf, _ = sample_tokens(logits, top_p=0.7)
    assert conf.item() == pytest.approx(0.625)
    # sampling frequencies at temperature 1
    many = logits.repeat(20000, 1)
    _, x = sample_tokens(many, temperature=1.0, generator=gen(0))
    freq = torch.bincount(x, minlength=4).float() / 20000
    assert torch.allclose(freq, p, atol=0.015)


def test_decode_answer():
    toks = torch.tensor([[9, 9, 1, 2, EOS, 3], [9, 9, 4, 5, 6, 7], [9, 9, 8, 30, 1, 1]])
    assert decode_answer(toks, 2, EOS) == [[1, 2], [4, 5, 6, 7], [8, 30, 1, 1]]
    assert decode_answer(toks, 2, [EOS, 30]) == [[1, 2], [4, 5, 6, 7], [8]]
    assert decode_answer(toks, 2, None)[0] == [1, 2, EOS, 3]
