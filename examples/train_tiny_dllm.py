"""Train the bundled tiny LLaDA-architecture masked-diffusion LM on this CPU.

    python examples/train_tiny_dllm.py --out dllmq/bundled/tiny-llada          # ~70 min on 2 cores

What it does, deterministically from --seed:
1. builds the offline training mix (dllmq.data.synthetic: math word problems, small Python
   functions with tests, facts of a generated world; CPython stdlib sources as plain text);
2. trains a byte-level BPE tokenizer with LLaDA's special tokens and chat template;
3. trains dllmq's native LLaDA model with LLaDA's objective: t ~ U(0,1], each maskable token
   masked with p = (1-eps)t + eps, cross-entropy on masked tokens weighted by 1/p. Chat items
   mask only the response (the prompt stays clean), padded with EOS as in LLaDA's SFT, so the
   model learns to end its answers; text items mask every token;
4. writes config.json, model.safetensors (bf16), the tokenizer, a loss log and a model card.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import save_file

from dllmq.data import corpus, synthetic
from dllmq.data.tokenizer import train_tokenizer
from dllmq.diffusion.masking import forward_process
from dllmq.models.llada import LLADA
from dllmq.models.tiny import llada_config

ARCH = dict(d_model=256, n_layers=6, n_heads=4, n_kv_heads=4, mlp_hidden_size=768, rope_theta=10000.0,
            max_sequence_length=512)


def tokenize_item(tok, item, max_len):
    """-> (ids, maskable) ; chat items use the Instruct template and mask only the response."""
    eos = tok.eos_token_id
    if "text" in item:
        ids = tok(item["text"], add_special_tokens=False).input_ids[: max_len - 1] + [eos]
        return ids, [True] * len(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=False,
                                     add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False).input_ids
    r = tok(item["response"], add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|eot_id|>"), eos]
    ids = (p + r)[:max_len]
    return ids, [False] * len(p) + [True] * (len(ids) - len(p))


def batches(tok, seed, max_len, token_budget, pool=512):
    """Length-bucketed batches padded with EOS (maskable, as LLaDA's SFT pads answers with EOS)."""
    stream = synthetic.training_stream(seed)
    rng = random.Random(seed)
    eos = tok.eos_token_id
    while True:
        items = [tokenize_item(tok, next(stream), max_len) for _ in range(pool)]
        items.sort(key=lambda x: len(x[0]))
        out, cur = [], []
        for it in items:
            L = max([len(it[0])] + [len(c[0]) for c in cur])
            if cur and L * (len(cur) + 1) > token_budget:
                out.append(cur)
                cur = []
            cur.append(it)
        if cur:
            out.append(cur)
        rng.shuffle(out)
        for group in out:
            L = max(len(ids) for ids, _ in group)
            ids = torch.full((len(group), L), eos, dtype=torch.long)
            maskable = torch.zeros((len(group), L), dtype=torch.bool)
            for i, (x, m) in enumerate(group):
                ids[i, : len(x)] = torch.tensor(x)
                maskable[i, : len(x)] = torch.tensor(m)
                if not m[0]:  # chat: EOS padding after the answer is part of the answer
                    maskable[i, len(x):] = True
            yield ids, maskable


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("dllmq/bundled/tiny-llada"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--token-budget", type=int, default=4096, help="tokens per batch (padded)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=500)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. tokenizer from a deterministic sample of the mix plus stdlib text
    sample = list(synthetic.tokenizer_corpus(args.seed, 20000)) + corpus.stdlib_documents(seed=args.seed)[:2000]
    special = train_tokenizer(sample, out, vocab_size=args.vocab_size)
    from dllmq.models.loading import load_tokenizer

    tok = load_tokenizer(out)
    vocab = len(tok)
    emb = int(math.ceil(vocab / 64) * 64)
    raw = llada_config(**ARCH, vocab_size=vocab, embedding_size=emb,
                       mask_token_id=special["mask_token_id"], eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.eos_token_id)
    raw.pop("auto_map")  # the bundled model needs no remote code anywhere
    raw["architectures"] = ["LLaDAModelLM"]
    raw["eot_token_id"] = special["eot_id"]
    raw["bos_token_id"] = special["bos_token_id"]

    # 3. model + LLaDA objective
    cfg = LLADA.parse_config(raw)
    model = LLADA.build(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params/1e6:.2f}M parameters, vocab {vocab}", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(tok, args.seed, args.max_len, args.token_budget)
    log_f = open(out / "training_log.csv", "w", newline="")
    log = csv.writer(log_f)
    log.writerow(["step", "loss", "tokens", "seconds", "lr"])
    tokens, t0, ema = 0, time.time(), None
    model.train()
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  disable=not sys.stdout.isatty()) as prog:
        task = prog.add_task("train", total=args.steps, loss="-")
        for step in range(args.steps):
            ids, maskable = next(data)
            noisy, masked, p_mask = forward_process(ids, cfg.mask_token_id, maskable=maskable, generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(noisy)
            ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
            pm = p_mask.expand_as(ids)[masked] if p_mask.dim() == 2 else p_mask
            loss = (ce / pm).sum() / maskable.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tokens += ids.numel()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if step % 10 == 0 or step == args.steps - 1:
                log.writerow([step, f"{ema:.4f}", tokens, f"{time.time()-t0:.1f}", f"{sched.get_last_lr()[0]:.2e}"])
                log_f.flush()
            if step % 100 == 0:
                print(f"step {step} loss {ema:.4f} tokens {tokens} {tokens/(time.time()-t0):.0f} tok/s", flush=True)
            prog.update(task, advance=1, loss=f"{ema:.3f}")
            if (step + 1) % args.save_every == 0 or step == args.steps - 1:
                save(model, raw, out, step + 1, tokens, ema, time.time() - t0, n_params, args)
    log_f.close()


def save(model, raw, out, steps, tokens, loss, seconds, n_params, args):
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = dict(raw, torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "training.json").write_text(json.dumps({
        "steps": steps, "tokens": tokens, "final_loss_ema": round(loss, 4), "seconds": round(seconds, 1),
        "parameters": n_params, "seed": args.seed, "lr": args.lr, "token_budget": args.token_budget,
        "max_len": args.max_len, "arch": ARCH, "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
