"""Which solution format lets a small masked-diffusion LM learn multi-digit arithmetic? (issue 13)

The bundled model writes tiny-math's worked solutions in the right form but gets most of the arithmetic wrong
(7 of 88 equations). This probe trains the same architecture (dllmq's LLaDA, LLaDA's SFT objective: the prompt
stays clean, the response is masked with p ~ U(0, 1], loss weighted by 1/p) from scratch on addition and
subtraction at tiny-math's number ranges, in several response formats, with the same steps and batch for each,
and scores greedy diffusion decoding (one token per step, most confident first) on held-out equations:

* plain:  ``153+78=`` -> ``231`` (the bundled model's format);
* carry:  ``153+78=`` -> ``3+8=11,5+7+1=13,1+1=2>231``: one column per step, least significant first, the carry
  written out, then the result (a copy of the column digits);
* reversed: ``153+78=`` -> ``132>231``: the result's digits least significant first, then the result.

Character-level vocabulary, so tokenization plays no part. Run:

    python benchmarks/arith_format_probe.py --minutes 20 --out benchmarks/results/arith_format_probe
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dllmq.diffusion.masking import forward_process
from dllmq.models.llada import LLADA
from dllmq.models.tiny import llada_config

CHARS = "0123456789+-=,>"
PAD, MASK = len(CHARS), len(CHARS) + 1  # PAD doubles as end of answer (LLaDA pads answers with EOS)
VOCAB = len(CHARS) + 2
RESP_LEN = 32


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def solution(a: int, op: str, b: int, fmt: str) -> str:
    c = a + b if op == "+" else a - b
    if fmt == "plain":
        return str(c)
    if fmt == "reversed":
        return str(c)[::-1] + ">" + str(c)
    da, db = _digits(a), _digits(b)
    cols, carry = [], 0
    for i in range(len(da)):
        x, y = da[i], db[i] if i < len(db) else 0
        if op == "+":
            s = x + y + carry
            cols.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
            carry = s // 10
        else:
            s = x - y - carry
            borrow = s < 0
            cols.append(f"{x + 10 if borrow else x}-{y}" + ("-1" if carry else "") + f"={s + 10 if borrow else s}")
            carry = int(borrow)
    if op == "+" and carry:
        cols.append("1")
    return ",".join(cols) + ">" + str(c)


def draw(rng: random.Random) -> tuple[int, str, int]:
    if rng.random() < 0.5:
        return rng.randint(1, 400), "+", rng.randint(1, 300)
    a = rng.randint(2, 450)
    return a, "-", rng.randint(1, a)


def held_out(a: int, op: str, b: int) -> bool:
    return int(hashlib.sha256(f"{a}{op}{b}".encode()).hexdigest()[:8], 16) % 10 == 0


def encode(s: str) -> list[int]:
    return [CHARS.index(ch) for ch in s]


def batch(rng: random.Random, n: int, fmt: str, split: str):
    prompts, resps = [], []
    while len(prompts) < n:
        a, op, b = draw(rng)
        if held_out(a, op, b) != (split == "test"):
            continue
        prompts.append(encode(f"{a}{op}{b}="))
        resps.append(encode(solution(a, op, b, fmt)))
    pl = max(map(len, prompts))
    ids = torch.full((n, pl + RESP_LEN), PAD, dtype=torch.long)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, resps)):
        ids[i, pl - len(p): pl] = torch.tensor(p)  # prompts right-aligned: the response starts at one column
        ids[i, pl: pl + len(r)] = torch.tensor(r)
        maskable[i, pl:] = True
    return ids, maskable, pl


@torch.no_grad()
def decode(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Greedy low-confidence decoding of every position from `start` on, one token per step."""
    x = ids.clone()
    x[:, start:] = MASK
    for _ in range(x.shape[1] - start):
        logits = model(x).float()
        logits[..., MASK] = -math.inf
        conf, pred = logits.softmax(-1).max(-1)
        still = x == MASK
        conf = torch.where(still, conf, torch.full_like(conf, -1.0))
        pos = conf.argmax(-1)
        rows = torch.arange(x.shape[0])
        x[rows, pos] = torch.where(still[rows, pos], pred[rows, pos], x[rows, pos])
    return x


def final_answer(row: list[int]) -> str:
    text = "".join(CHARS[t] if t < len(CHARS) else " " for t in row).split(" ")[0]
    return text.split(">")[-1]


def run(fmt: str, minutes: float, seed: int, n_test: int) -> dict:
    torch.manual_seed(seed)
    raw = llada_config(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, vocab_size=VOCAB,
                       embedding_size=VOCAB, mask_token_id=MASK, eos_token_id=PAD, pad_token_id=PAD,
                       max_sequence_length=128)
    model = LLADA.build(LLADA.parse_config(raw))
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(f"{seed}-train")
    t0, step, log = time.time(), 0, []
    gen = torch.Generator().manual_seed(seed)
    while time.time() - t0 < minutes * 60:
        lr = 1e-3 * min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, maskable, _ = batch(rng, 128, fmt, "train")
        noisy, masked, pm = forward_process(ids, MASK, maskable=maskable, generator=gen)
        logits = model(noisy)
        ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
        loss = (ce / pm.expand_as(ids)[masked]).sum() / maskable.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)})
            print(fmt, log[-1], flush=True)
    model.eval()
    ids, _, start = batch(random.Random(f"{seed}-test"), n_test, fmt, "test")
    out = decode(model, ids, start)
    right = [final_answer(out[i, start:].tolist()) == final_answer(ids[i, start:].tolist()) for i in range(n_test)]
    return {"format": fmt, "steps": step, "seconds": round(time.time() - t0, 1), "n_test": n_test,
            "exact_match": sum(right) / n_test, "stderr": math.sqrt(max(1e-9, sum(right) / n_test *
                                                                         (1 - sum(right) / n_test)) / n_test),
            "example": solution(153, "+", 78, fmt), "log": log}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["plain", "carry", "reversed"])
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall time per format")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "arith_format_probe")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # formats measured by an earlier run with the same settings are kept (a later run adds or replaces formats)
    old = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {}
    same = {k: old.get("args", {}).get(k) for k in ("minutes", "seed", "n_test")} == \
        {"minutes": str(args.minutes), "seed": str(args.seed), "n_test": str(args.n_test)}
    results = [r for r in old.get("results", []) if same and r["format"] not in args.formats]
    for fmt in args.formats:
        results.append(run(fmt, args.minutes, args.seed, args.n_test))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "results": results}, indent=1))
        lines = ["| format | example response | steps | exact match (n) |", "|---|---|---|---|"]
        lines += [f"| {r['format']} | `{r['example']}` | {r['steps']} | {100 * r['exact_match']:.1f} ± "
                  f"{100 * r['stderr']:.1f} % ({r['n_test']}) |" for r in results]
        args.out.with_suffix(".md").write_text(
            f"Addition/subtraction at tiny-math's ranges, {args.minutes} min of training per format on this CPU "
            f"(`python benchmarks/arith_format_probe.py --minutes {args.minutes}`):\n\n" + "\n".join(lines) + "\n")
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
