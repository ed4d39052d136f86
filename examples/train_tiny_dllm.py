"""Train the bundled tiny LLaDA-architecture masked-diffusion LM on this CPU.

    python examples/train_tiny_dllm.py --out dllmq/bundled/tiny-llada          # hours on 2 cores
    python examples/train_tiny_dllm.py --device cuda --workers 14 --time-budget 420 \
        --tokenizer dllmq/bundled/tiny-llada --out /tmp/tiny                  # one GPU, 7 minutes

What it does, deterministically from --seed:
1. builds the offline training mix (dllmq.data.synthetic: math word problems, small Python
   functions with tests, facts of a generated world; CPython stdlib sources as plain text);
2. trains a byte-level BPE tokenizer with LLaDA's special tokens and chat template;
3. trains dllmq's native LLaDA model with LLaDA's objective: t ~ U(0,1], each maskable token
   masked with p = (1-eps)t + eps, cross-entropy on masked tokens weighted by 1/p. Chat items
   mask only the response (the prompt stays clean), padded with EOS as in LLaDA's SFT, so the
   model learns to end its answers; text items mask every token;
4. writes config.json, model.safetensors (bf16), the tokenizer, a loss log and a model card;
5. scores greedy diffusion generation on the first --eval-math held-out tiny-math problems
   (no lm-eval needed, so it runs on a bare GPU machine) and records it in training.json.

With --workers N the data (generation, tokenisation, masking) runs in N processes, each on its
own shard of the stream (same world, same held-out split). With --time-budget the cosine
schedule runs over wall-clock time instead of steps, so the end point depends on the hardware;
training.json records the steps and tokens actually used.
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

# The next bundled model's shape. The current one (trained 2026-11-30) has 6 heads of 64: QuaRot's online Hadamard
# across heads needs a Hadamard matrix of order n_heads, and none of order 6 exists (QuaRot's reference refuses it
# too), so 8 heads of 48 (orders 8 and 48 = 12 * 4 exist). The CPU-trained one before: d_model 256, 6 blocks,
# 4 heads, MLP 768.
ARCH = dict(d_model=384, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1024, rope_theta=10000.0,
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


def batches(tok, seed, max_len, token_budget, pool=512, shard=0, mixture=None, math_format="plain"):
    """Length-bucketed batches padded with EOS (maskable, as LLaDA's SFT pads answers with EOS)."""
    stream = synthetic.training_stream(seed, shard=shard, mixture=mixture, math_format=math_format)
    rng = random.Random(seed if not shard else f"{seed}-{shard}")
    eos = tok.eos_token_id
    pool = max(pool, token_budget // 16)  # several full batches per pool, whatever the budget
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
        if cur and max(len(c[0]) for c in cur) * len(cur) >= token_budget // 2:
            out.append(cur)  # a small leftover batch would be a high-variance step: drop it
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


class NoisedBatches(torch.utils.data.IterableDataset):
    """Batches with LLaDA's forward process applied, one independent shard per worker process,
    so that generation, tokenisation and masking stay off the training loop."""

    def __init__(self, tok_dir, seed, max_len, token_budget, mask_id, mixture=None, math_format="plain"):
        self.tok_dir, self.seed, self.max_len, self.budget, self.mask_id = tok_dir, seed, max_len, token_budget, mask_id
        self.mixture, self.math_format = mixture, math_format

    def __iter__(self):
        from dllmq.models.loading import load_tokenizer

        info = torch.utils.data.get_worker_info()
        shard = 0 if info is None else info.id + 1
        torch.set_num_threads(1)
        tok = load_tokenizer(Path(self.tok_dir))
        gen = torch.Generator().manual_seed(self.seed * 1000 + shard)
        for ids, maskable in batches(tok, self.seed, self.max_len, self.budget, shard=shard,
                                         mixture=self.mixture, math_format=self.math_format):
            noisy, masked, p_mask = forward_process(ids, self.mask_id, maskable=maskable, generator=gen)
            yield ids, maskable, noisy, masked, p_mask.expand_as(ids).contiguous()


def math_accuracy(model, tok, n, device, batch_size=32, gen_length=64):
    """Exact match of greedy diffusion generation on the first n held-out tiny-math problems
    (the bundled task's preset: 64 tokens, 64 steps, blocks of 32; longer for the columns format)."""
    from dllmq.diffusion.generation import GenerationConfig, generate
    from dllmq.evaluation.tasks import extract_answer

    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "dllmq/bundled/tasks/tiny-math.jsonl")
            .read_text().splitlines()[:n]]
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        gcfg = GenerationConfig(steps=gen_length, gen_length=gen_length, block_length=32)
        outs = generate(model, tok, [r["question"] for r in rows], gcfg, batch_size=batch_size)
    model.train()
    return sum(extract_answer(o["text"]) == r["answer"] for o, r in zip(outs, rows)) / max(1, len(rows))


def parse_mix(text):
    """'math_chat=0.5,arith_text=0.3' -> {source: share} normalised to sum 1 (None: the default mix)."""
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name.strip() not in synthetic.MIXTURE or not share:
            raise SystemExit(f"--mix: bad entry {part!r}; use source=share with sources {sorted(synthetic.MIXTURE)}")
        mix[name.strip()] = float(share)
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("dllmq/bundled/tiny-llada"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds of training; the LR schedule follows wall-clock progress (stops at --steps too)")
    ap.add_argument("--token-budget", type=int, default=4096, help="tokens per batch (padded)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="reuse this folder's tokenizer instead of training one (keeps token ids stable)")
    ap.add_argument("--d-model", type=int, default=ARCH["d_model"])
    ap.add_argument("--n-layers", type=int, default=ARCH["n_layers"])
    ap.add_argument("--n-heads", type=int, default=ARCH["n_heads"])
    ap.add_argument("--mlp-hidden", type=int, default=ARCH["mlp_hidden_size"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--workers", type=int, default=0, help="data-loader processes (0: in the training loop)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--save-every-s", type=float, default=None, help="also save every this many seconds")
    ap.add_argument("--init", type=Path, default=None,
                    help="fine-tune: start from this model folder's weights, shape and tokenizer")
    ap.add_argument("--mix", default=None,
                    help="token shares replacing the default mix, e.g. math_chat=0.5,arith_text=0.3,code_chat=0.2")
    ap.add_argument("--math-format", choices=synthetic.MATH_FORMATS, default="plain",
                    help="how math solutions and drills are written: plain (53 - 49 = 4) or columns "
                         "(53 - 49: 13-9=4,5-4-1=0>4, see benchmarks/arith_format_probe.py)")
    ap.add_argument("--eval-gen-length", type=int, default=64, help="tokens generated per --eval-math problem")
    ap.add_argument("--eval-math", type=int, default=0,
                    help="after training, score greedy generation on this many held-out tiny-math problems")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    mixture = parse_mix(args.mix)
    if args.init is not None:
        # fine-tuning keeps the starting model's shape and tokenizer (token ids must not move)
        init_cfg = json.loads((args.init / "config.json").read_text())
        args.tokenizer = args.init
        args.d_model, args.n_layers, args.n_heads = init_cfg["d_model"], init_cfg["n_layers"], init_cfg["n_heads"]
        args.mlp_hidden = init_cfg["mlp_hidden_size"]

    dev_name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(dev_name)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    arch = dict(ARCH, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads,
                mlp_hidden_size=args.mlp_hidden)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    from dllmq.models.loading import load_tokenizer

    if args.tokenizer is not None:
        tok = load_tokenizer(args.tokenizer)
        tok.save_pretrained(str(out))
        from dllmq.data.tokenizer import special_token_ids

        special = special_token_ids(tok)
    else:
        # 1-2. tokenizer from a deterministic sample of the mix plus stdlib text
        sample = list(synthetic.tokenizer_corpus(args.seed, 20000)) + corpus.stdlib_documents(seed=args.seed)[:2000]
        special = train_tokenizer(sample, out, vocab_size=args.vocab_size)
    tok = load_tokenizer(out)
    vocab = len(tok)
    emb = int(math.ceil(vocab / 64) * 64)
    raw = llada_config(**arch, vocab_size=vocab, embedding_size=emb,
                       mask_token_id=special["mask_token_id"], eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.eos_token_id)
    raw.pop("auto_map")  # the bundled model needs no remote code anywhere
    raw["architectures"] = ["LLaDAModelLM"]
    raw["eot_token_id"] = special["eot_id"]
    raw["bos_token_id"] = special["bos_token_id"]

    # 3. model + LLaDA objective
    cfg = LLADA.parse_config(raw)
    model = LLADA.build(cfg)
    if args.init is not None:
        from dllmq.models.loading import load_model

        model.load_state_dict(load_model(args.init, dtype=torch.float32).state_dict())
    else:
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params/1e6:.2f}M parameters, vocab {vocab}, device {device}", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    t0 = time.time()

    def progress(step):
        p = step / args.steps
        if args.time_budget:
            p = max(p, (time.time() - t0) / args.time_budget)
        return min(1.0, p)

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress(s)))))
    data = torch.utils.data.DataLoader(
        NoisedBatches(out, args.seed, args.max_len, args.token_budget, cfg.mask_token_id, mixture,
                      args.math_format), batch_size=None,
        num_workers=args.workers, pin_memory=device.type == "cuda", prefetch_factor=8 if args.workers else None,
        persistent_workers=False)
    data = iter(data)
    log_f = open(out / "training_log.csv", "w", newline="")
    log = csv.writer(log_f)
    log.writerow(["step", "loss", "tokens", "seconds", "lr"])
    tokens, ema, last_save, skipped = 0, None, time.time(), 0
    state = {}
    model.train()
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  disable=not sys.stdout.isatty()) as prog:
        task = prog.add_task("train", total=args.steps, loss="-")
        step = 0
        t0 = time.time()  # the schedule's clock starts with the first batch, not with worker start-up
        while step < args.steps and progress(step) < 1.0:
            ids, maskable, noisy, masked, pm = (t.to(device, non_blocking=True) for t in next(data))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(noisy)
            ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
            loss = (ce / pm[masked]).sum() / maskable.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if not torch.isfinite(norm):  # skip a non-finite step instead of poisoning the weights
                skipped += 1
                opt.zero_grad(set_to_none=True)
                step += 1
                continue
            opt.step()
            sched.step()
            tokens += ids.numel()
            if step % 10 == 0:  # .item() syncs the GPU: only read the loss every few steps
                val = loss.item()
                ema = val if ema is None else 0.8 * ema + 0.2 * val
                log.writerow([step, f"{ema:.4f}", tokens, f"{time.time()-t0:.1f}", f"{sched.get_last_lr()[0]:.2e}"])
                log_f.flush()
            if step % 100 == 0:
                print(f"step {step} loss {ema:.4f} tokens {tokens} {tokens/(time.time()-t0):.0f} tok/s"
                      f" skipped {skipped}", flush=True)
            prog.update(task, advance=1, loss=f"{ema:.3f}")
            step += 1
            if step % args.save_every == 0 or (args.save_every_s and time.time() - last_save > args.save_every_s):
                state = save(model, raw, out, step, tokens, ema, time.time() - t0, n_params, args, arch, dev_name)
                last_save = time.time()
    log_f.close()
    state = save(model, raw, out, step, tokens, ema, time.time() - t0, n_params, args, arch, dev_name)
    if args.eval_math:
        t1 = time.time()
        try:
            acc = math_accuracy(model, tok, args.eval_math, device, gen_length=args.eval_gen_length)
        except Exception as e:  # the trained model is saved already; a scoring failure must not lose it
            print(f"tiny-math scoring failed: {type(e).__name__}: {e}", flush=True)
            return
        state["tiny_math_first_n"] = {"n": args.eval_math, "exact_match": round(acc, 4),
                                      "seconds": round(time.time() - t1, 1)}
        (out / "training.json").write_text(json.dumps(state, indent=2))
        print(f"tiny-math (first {args.eval_math}, greedy): {acc:.3f}", flush=True)


def save(model, raw, out, steps, tokens, loss, seconds, n_params, args, arch, device):
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")  # a kill mid-save leaves the previous save intact
    for stale in [out / "model.safetensors.index.json", *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # an index would win over the new file (e.g. in the sharded bundled folder)
    raw = dict(raw, torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    info = {
        "steps": steps, "tokens": tokens, "final_loss_ema": round(loss or 0.0, 4), "seconds": round(seconds, 1),
        "parameters": n_params, "seed": args.seed, "lr": args.lr, "token_budget": args.token_budget,
        "max_len": args.max_len, "arch": arch, "torch": torch.__version__, "device": device,
        "time_budget": args.time_budget, "workers": args.workers,
        "init": str(args.init) if args.init else None, "mix": args.mix, "math_format": args.math_format,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
