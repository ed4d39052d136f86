"""Calibration sets: TMAS state allocation over the whole set, text windows, the valid mask."""

import json
import random
from pathlib import Path

import pytest
import torch

import dllmq
from dllmq.calibration.data import TextCorpus, _corpus_tokens, encode_batch, resolve_windows
from dllmq.calibration.sources import load_items
from dllmq.calibration.states import TMASConfig, allocate_states, build, segment_steps, span_bounds
from dllmq.models.loading import load_tokenizer

PROPS = (0.3, 0.2, 0.2, 0.3)
BUNDLED = Path(dllmq.__file__).parent / "bundled" / "tiny-llada"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUNDLED)


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "seven", "blue", "quiet", "north", "code", "sum"]
    lines = [" ".join(rng.choice(vocab) for _ in range(12)) + "." for _ in range(n // 12)]
    return "\n\n".join(lines)


def _span_totals(plan, k=4):
    c = [0] * k
    for batch in plan:
        for _, s in batch:
            c[s] += 1
    return c


def test_per_batch_rounding_was_uniform_and_is_fixed():
    """The old per-batch rounding turned 0.3/0.2/0.2/0.3 into 1/1/1/1 at 4 states per prompt;
    over the default set (32 samples, batch 8: 4 batches x 4 states) the shares are now 5/3/3/5."""
    one = segment_steps(64, PROPS, 4, torch.Generator().manual_seed(0))
    assert sorted(s * 4 // 64 for s in one) == [0, 1, 2, 3]  # one batch alone cannot do better
    plan = allocate_states(64, PROPS, 4, 4, torch.Generator().manual_seed(0))
    assert _span_totals(plan) == [5, 3, 3, 5]


@pytest.mark.parametrize("samples,batch_size,states,steps", [
    (32, 8, 4, 64),  # the defaults
    (8, 4, 4, 8),  # the pipeline tests' TMAS setting
    (128, 8, 4, 64),
    (30, 8, 3, 64),
    (100, 16, 5, 128),
    (7, 2, 6, 32),
    (5, 8, 4, 64),  # a single batch
])
def test_tmas_shares_follow_proportions_over_the_whole_set(samples, batch_size, states, steps):
    nb = -(-samples // batch_size)
    plan = allocate_states(steps, PROPS, nb, states, torch.Generator().manual_seed(3))
    assert len(plan) == nb
    total = nb * states
    counts = _span_totals(plan)
    assert sum(counts) == total
    assert all(abs(c - p * total) < 1 for c, p in zip(counts, PROPS)), (counts, [p * total for p in PROPS])
    for batch in plan:
        steps_ = [st for st, _ in batch]
        assert len(batch) == states and len(set(steps_)) == states  # distinct steps per batch
        for st, s in batch:
            lo, hi = span_bounds(steps, 4, s)
            assert lo <= st < hi  # each step lies in its span
    assert all(c > 0 for c, p in zip(counts, PROPS) if p * total >= 1)  # every span appears


def test_tmas_spans_are_spread_across_batches():
    plan = allocate_states(64, PROPS, 4, 4, torch.Generator().manual_seed(0))
    for batch in plan:  # with 4 states per batch and 4 spans, no batch misses more than one span
        assert len({s for _, s in batch}) >= 3


def test_tmas_allocation_deterministic_for_a_seed():
    a = allocate_states(64, PROPS, 4, 4, torch.Generator().manual_seed(1))
    b = allocate_states(64, PROPS, 4, 4, torch.Generator().manual_seed(1))
    c = allocate_states(64, PROPS, 4, 4, torch.Generator().manual_seed(2))
    assert a == b and a != c


def test_tmas_too_few_steps_per_span_stays_distinct():
    plan = allocate_states(8, (0.7, 0.1, 0.1, 0.1), 2, 4, torch.Generator().manual_seed(0))
    for batch in plan:
        assert len({st for st, _ in batch}) == 4


def test_tmas_description_and_valid(tiny_llada):
    from dllmq.models.loading import load_model

    model = load_model(tiny_llada, device="cpu", dtype=torch.float32)
    t = load_tokenizer(tiny_llada)
    items = [{"text": "one two three four " * (1 + i % 3)} for i in range(8)]  # prompts of different lengths
    cfg = TMASConfig(gen_length=16, block_length=8, steps=8, states_per_prompt=4)

    def run(seed):
        return build(items, t, model.mask_token_id, "tmas", 48, seed=seed, batch_size=4, fp_model=model, tmas=cfg)

    cs = run(0)
    d = cs.description
    assert len(d["states"]) == len(cs.batches) == 2 * 4
    assert {"batch", "step", "span", "mask_ratio"} <= set(d["states"][0])
    assert d["span_counts"] == [sum(1 for s in d["states"] if s["span"] == k) for k in range(4)]
    assert all(abs(c - p * 8) < 1 for c, p in zip(d["span_counts"], PROPS))
    for j in range(2):
        steps = [s["step"] for s in d["states"] if s["batch"] == j]
        assert len(steps) == 4 and len(set(steps)) == 4
    for b in cs.batches:  # prompts of different lengths: left padding is marked invalid
        assert b.valid is not None and b.valid.dtype == torch.bool
        assert torch.equal(b.valid, b.attention_mask.bool())
        assert not b.valid[:, -cfg.gen_length:].eq(False).any()
    again = run(0)
    assert again.description == d
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(cs.batches, again.batches))


def test_txt_source_gives_exact_windows_without_padding(tok, tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(_words(3000))
    items = load_items(str(f), 6, seed=0)
    assert len(items) == 6
    cs = build(items, tok, 0, "none", 32, seed=0, batch_size=4)
    stream = _corpus_tokens(tok, TextCorpus([f.read_text()]))
    assert len(stream) >= 6 * 32
    rows = torch.cat([b.ids for b in cs.batches])
    assert rows.shape == (6, 32)
    assert all(b.valid is None for b in cs.batches)  # no padding
    assert cs.description["padding_tokens"] == 0 and cs.description["windows"] == 6
    assert not cs.description["overlapping"]
    text = torch.tensor(stream)
    starts = []
    for r in rows:  # every row is a contiguous slice of the token stream
        hits = [s for s in range(len(stream) - 31) if torch.equal(text[s : s + 32], r)]
        assert hits
        starts.append(hits[0])
    starts.sort()
    assert all(b - a >= 32 for a, b in zip(starts, starts[1:]))  # enough text: no overlap


def test_windows_reproducible_for_a_seed(tok, tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(_words(3000))

    def rows(seed, mode="none"):
        cs = build(load_items(str(f), 5, seed=seed), tok, 0, mode, 24, seed=seed, batch_size=2)
        return torch.cat([b.ids for b in cs.batches])

    assert torch.equal(rows(0), rows(0))
    assert torch.equal(rows(0, "random"), rows(0, "random"))
    assert not torch.equal(rows(0), rows(1))


def test_short_text_overlaps_or_falls_back_to_one_padded_sequence(tok, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text(_words(120))
    n_tok = len(_corpus_tokens(tok, TextCorpus([f.read_text()])))
    cs = build(load_items(str(f), 8, seed=0), tok, 0, "none", n_tok // 2, seed=0)
    assert cs.description["overlapping"] and cs.description["windows"] == 8
    assert all(b.valid is None for b in cs.batches)
    cs = build(load_items(str(f), 8, seed=0), tok, 0, "none", n_tok + 10, seed=0)
    assert cs.description["short_corpus"] and len(cs.batches) == 1 and cs.batches[0].ids.shape[0] == 1
    v = cs.batches[0].valid
    assert v is not None and int(v.sum()) == n_tok and not v[0, n_tok:].any()


def test_jsonl_text_items_joined_with_eos_and_chat_padding_invalid(tok, tmp_path):
    f = tmp_path / "mix.jsonl"
    docs = [_words(600, seed=i) for i in range(3)]
    lines = [json.dumps({"text": d}) for d in docs] + [json.dumps({"prompt": "What is 2+2?", "response": "4"})]
    f.write_text("\n".join(lines) + "\n")
    items = load_items(str(f), 8, seed=0)
    assert sum("corpus" in it for it in items) == 6 and sum("prompt" in it for it in items) == 2
    stream = _corpus_tokens(tok, items[[("corpus" in it) for it in items].index(True)]["corpus"])
    assert stream.count(tok.eos_token_id) == 2  # 3 documents, 2 separators
    resolved, _ = resolve_windows(tok, items, 40, seed=0)
    ids, maskable, valid = encode_batch(tok, resolved, 40)
    for i, it in enumerate(resolved):
        if "prompt" in it:  # chat: only the response maskable, the EOS padding after it invalid
            n_real = int(valid[i].sum())
            assert 0 < n_real < 40 and not valid[i, n_real:].any()
            assert ids[i, n_real:].eq(tok.eos_token_id).all()
            assert maskable[i, n_real - 1] and not maskable[i, 0]
        else:
            assert valid[i].all()
    cs = build(items, tok, 0, "random", 40, seed=0, batch_size=8)
    assert torch.equal(cs.batches[0].valid, valid)


def test_bundled_items_mark_padding(tok):
    cs = build(load_items("bundled", 8, seed=0), tok, 0, "none", 128, seed=0, batch_size=8)
    v = cs.batches[0].valid
    assert v is not None and not v.all() and v[:, 0].all()
    again = build(load_items("bundled", 8, seed=0), tok, 0, "none", 128, seed=0, batch_size=8)
    assert torch.equal(cs.batches[0].ids, again.batches[0].ids)
