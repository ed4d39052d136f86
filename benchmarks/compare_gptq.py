"""Side-by-side GPTQ: dllmq vs llm-compressor (and GPTQModel, optional) on one small LLaMA model.

    .venv/bin/python benchmarks/compare_gptq.py            # full run (creates the peer venvs once)
    .venv/bin/python benchmarks/compare_gptq.py --no-gptqmodel --repeats 1

What it does (everything cached under benchmarks/.cache/, which ignores itself for git):

1. Peer venvs: benchmarks/.cache/venv-llmcompressor (torch==2.13.0 CPU, llmcompressor==0.14.0.1) and
   benchmarks/.cache/venv-gptqmodel (torch==2.13.0 CPU, gptqmodel==7.6.0), created once with pip.
2. Data, tokenized once: CPython stdlib source chunks (dllmq.data.corpus), split by document into
   train / calibration / held-out; a 4096-entry byte-level BPE tokenizer (dllmq.data.tokenizer) is
   trained on the train split only. Calibration: 64 x 256 token ids; held-out: 32 x 256 token ids
   from documents neither the tokenizer, the model nor calibration saw. Saved as ids (safetensors).
3. Model, built once: a transformers LlamaForCausalLM (hidden 256, 4 layers, 4 heads, intermediate
   768, vocab 4096, untied head) trained briefly on the train split (next-token loss), saved with
   save_pretrained (safetensors) plus the tokenizer. Every tool reads this same folder.
4. Quantization, each run in a fresh subprocess with the same torch thread count (--threads):
   (a) llm-compressor: GPTQModifier (int, symmetric, group 128 or per channel, damp 0.01,
       block 128, actorder=None, lm_head ignored) via oneshot(pipeline="sequential", batch 8) on
       the calibration ids; benchmarks/peers/llmc_gptq.py.
   (b) dllmq: pipeline.quantize(method gptq, same spec, damp 0.01, act_order off, block 128,
       sequential on, calib-mask none, batch 8). The SAME ids are fed in-process: this script
       replaces `dllmq.pipeline._build_calibration` in the worker with a function returning a
       CalibrationSet of those ids (mask none), so no text round trip is involved.
       dllmq's GPTQ chooses each group's scale by a clipping search (scale_search "mse", its
       default) and, by default (`--dtype auto`), runs the calibration forwards in bf16 where the
       CPU has native bf16 (the fp32 weights are still what GPTQ quantizes); extra reference rows:
       float32 calibration forwards (`--dtype float32`), sequential off (one
       Hessian pass per block, as llm-compressor's layer-wise pipeline does), min-max scales
       (scale_search "minmax", as the peers), and RTN (no calibration).
   (c) GPTQModel (optional): GPTQModel.load + quantize(batch 8, desc_act off, damp 0.01);
       benchmarks/peers/gptqmodel_gptq.py.
   Timed: the quantization call only. llm-compressor / GPTQModel: oneshot() / model.quantize()
   (excludes imports, model loading and saving; saving is reported separately in the JSON).
   dllmq: the whole pipeline.quantize() call, which INCLUDES reading the FP shards and writing
   the packed checkpoint (dllmq has no separate save step). Median over --repeats runs, run
   round robin across tools; process CPU time of the same call is reported too.
5. Metrics, all in this (main) venv with the same code, on the held-out ids: relative logits error
   ||logits_q - logits_fp|| / ||logits_fp|| (Frobenius over all positions), mean per-token
   KL(p_fp || p_q), and next-token perplexity. The FP reference is transformers' model.
   llm-compressor's compressed checkpoint is decompressed by transformers + compressed-tensors
   inside its venv and exported as plain fp32 weights (checked here to lie on a 4-bit grid);
   dllmq's is loaded with dllmq.load(dtype=float32) with real QuantLinear layers (dequant kernel);
   GPTQModel's is dequantized inside its venv by its own TorchQuantLinear.

Output: a markdown table on stdout, benchmarks/results/compare_gptq.md and compare_gptq.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
WORK = CACHE / "compare_gptq"
RESULTS = ROOT / "benchmarks" / "results"
PEERS = ROOT / "benchmarks" / "peers"

VENVS = {
    "llmcompressor": (CACHE / "venv-llmcompressor", [["-U", "pip"], ["torch==2.13.0"], ["llmcompressor==0.14.0.1"]]),
    "gptqmodel": (CACHE / "venv-gptqmodel", [["-U", "pip"], ["torch==2.13.0"], ["gptqmodel==7.6.0"]]),
}

MODEL_SPEC = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512)
DATA_SPEC = dict(corpus_chars=3_000_000, seq_len=256, n_calib=64, n_heldout=32, vocab=4096, doc_seed=0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- venvs
def ensure_venv(name: str) -> Path:
    venv, steps = VENVS[name]
    py = venv / "bin" / "python"
    if (venv / ".ready").exists():
        return py
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    log(f"creating {venv} (one time; pip installs {', '.join(s[-1] for s in steps)})")
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)  # the system python, not this venv
    for s in steps:
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *s], check=True)
    (venv / ".ready").touch()
    return py


# ------------------------------------------------------------------------------------ data, model
def _cached(dir_: Path, spec: dict) -> bool:
    f = dir_ / "spec.json"
    return f.exists() and json.loads(f.read_text()) == spec


def build_data() -> tuple[Path, Path]:
    """-> (tokenizer dir, ids file with train / calib / heldout)."""
    import torch
    from safetensors.torch import save_file

    d = WORK / "data"
    if _cached(d, DATA_SPEC):
        return d / "tokenizer", d / "ids.safetensors"
    from dllmq.data.corpus import stdlib_documents
    from dllmq.data.tokenizer import load_tokenizer, train_tokenizer

    log("building data: stdlib documents, tokenizer, ids")
    docs = stdlib_documents(seed=DATA_SPEC["doc_seed"], max_total_chars=DATA_SPEC["corpus_chars"])
    k = len(docs) // 20
    held_docs, calib_docs, train_docs = docs[:k], docs[k : 2 * k], docs[2 * k :]
    train_tokenizer(train_docs, d / "tokenizer", vocab_size=DATA_SPEC["vocab"])
    tok = load_tokenizer(d / "tokenizer")
    eos, L = tok.eos_token_id, DATA_SPEC["seq_len"]

    def chunks(texts, n=None):
        stream = []
        for t in texts:
            stream.extend(tok(t, add_special_tokens=False).input_ids + [eos])
            if n is not None and len(stream) >= n * L:
                break
        m = len(stream) // L if n is None else n
        if len(stream) < m * L:
            raise RuntimeError(f"not enough text for {m} x {L} tokens")
        return torch.tensor(stream[: m * L]).view(m, L)

    ids = {"calib": chunks(calib_docs, DATA_SPEC["n_calib"]), "heldout": chunks(held_docs, DATA_SPEC["n_heldout"]),
           "train": chunks(train_docs)}
    save_file(ids, str(d / "ids.safetensors"))
    (d / "spec.json").write_text(json.dumps(DATA_SPEC))
    log(f"data: train {tuple(ids['train'].shape)}, calib {tuple(ids['calib'].shape)}, "
        f"heldout {tuple(ids['heldout'].shape)} (docs {len(train_docs)}/{len(calib_docs)}/{len(held_docs)})")
    return d / "tokenizer", d / "ids.safetensors"


def build_model(tok_dir: Path, ids_file: Path, steps: int, threads: int) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    d = WORK / "model-fp"
    spec = {**MODEL_SPEC, "train_steps": steps, "data": DATA_SPEC}
    if _cached(d, spec):
        return d
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL_SPEC, bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
                      rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    train = load_file(str(ids_file))["train"]
    if steps:
        log(f"training the LLaMA model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params) "
            f"for {steps} steps on {train.shape[0]} x {train.shape[1]} train tokens, {threads} thread(s)")
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
        g = torch.Generator().manual_seed(0)
        model.train()
        t0 = time.time()
        for s in range(steps):
            batch = train[torch.randint(0, train.shape[0], (8,), generator=g)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if s % 50 == 0 or s == steps - 1:
                log(f"  step {s}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    (d / "spec.json").write_text(json.dumps(spec))
    return d


# ------------------------------------------------------------------------------------ quantizers
def _run(cmd: list[str], env_extra: dict | None = None, threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", **(env_extra or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(WORK))  # peers may drop logs in cwd
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = "\n".join((p.stdout + "\n" + p.stderr).splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (rc {p.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def worker_dllmq(a) -> None:
    """Subprocess entry: dllmq quantize() on pre-tokenized ids; prints RESULT json."""
    import torch

    torch.set_num_threads(a.threads)
    from safetensors.torch import load_file

    import dllmq.pipeline as pl
    from dllmq.calibration.states import CalibBatch, CalibrationSet
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.quantization.spec import WeightSpec

    ids = load_file(a.calib)["calib"]
    n, L = ids.shape
    batches = [CalibBatch(ids=ids[b : b + a.batch_size].clone(), attention_mask=None,
                          masked=torch.zeros_like(ids[b : b + a.batch_size], dtype=torch.bool))
               for b in range(0, n, a.batch_size)]

    def fixed_calibration(src, arch, calib, want_conf, device, prog):  # same signature as the original
        return CalibrationSet(batches, {"mode": "none", "samples": n, "seq_len": L, "tokens": n * L,
                                        "source": "pre-tokenized ids (benchmarks/compare_gptq.py)"})

    pl._build_calibration = fixed_calibration
    spec = WeightSpec(a.bits, True, "channel", None) if a.group_size == -1 else WeightSpec(a.bits, True, "group",
                                                                                             a.group_size)
    qcfg = QuantizationConfig(a.method, spec, ignore=[r"lm_head"])
    opts = ({"damp": a.damp, "act_order": False, "scale_search": a.scale_search}
            if a.method == "gptq" else {})
    t0, c0 = time.perf_counter(), time.process_time()
    res = pl.quantize(a.model, qcfg, a.out, overwrite=True, method_options=opts,
                      calib=pl.CalibOptions(calib="ids", samples=n, seq_len=L, mask="none", batch_size=a.batch_size),
                      sequential=bool(a.sequential), show_progress=False, dtype=a.dtype if a.dtype == "auto" else getattr(torch, a.dtype))
    quant_s, quant_cpu = time.perf_counter() - t0, time.process_time() - c0
    print("RESULT " + json.dumps({"tool": "dllmq", "quant_seconds": quant_s, "quant_cpu_seconds": quant_cpu,
                                  "save_seconds": 0.0, "scale_search": a.scale_search,
                                  "layer_seconds": sum(r.seconds for r in res.layers), "threads": a.threads,
                                  "mean_layer_rel_error": sum(r.rel_error for r in res.layers) / len(res.layers)}),
          flush=True)


def run_tool(tool: str, variant: str, model_dir: Path, ids_file: Path, gs: int, out: Path, a, dense: bool) -> dict:
    common = ["--model", str(model_dir), "--calib", str(ids_file), "--out", str(out), "--group-size", str(gs),
              "--threads", str(a.threads)]
    dense_arg = ["--dense-out", str(out) + "-dense"] if dense else []
    if tool == "llm-compressor":
        py = ensure_venv("llmcompressor")
        return _run([str(py), str(PEERS / "llmc_gptq.py"), *common, "--damp", "0.01", "--batch-size", "8",
                     *dense_arg], threads=a.threads)
    if tool == "GPTQModel":
        py = ensure_venv("gptqmodel")
        return _run([str(py), str(PEERS / "gptqmodel_gptq.py"), *common, "--damp", "0.01", "--batch-size", "8",
                     *dense_arg], env_extra={"GPTQMODEL_CPU_WORKERS": "2"}, threads=a.threads)
    method, seq, search, dtype = {"gptq": ("gptq", 1, "mse", "auto"), "gptq-fp32": ("gptq", 1, "mse", "float32"),
                                  "gptq-nonseq": ("gptq", 0, "mse", "float32"),
                                  "rtn": ("rtn", 1, "minmax", "float32"),
                                  "gptq-minmax": ("gptq", 0, "minmax", "float32"),
                                  "gptq-nonseq-bf16": ("gptq", 0, "mse", "bfloat16")}[variant]
    return _run([sys.executable, str(Path(__file__).resolve()), "worker-dllmq", *common, "--method", method,
                 "--sequential", str(seq), "--damp", "0.01", "--batch-size", "8", "--scale-search", search,
                 "--dtype", dtype], threads=a.threads)


# --------------------------------------------------------------------------------------- metrics
def heldout_metrics(logits_fn, ids, fp_logits=None, bs: int = 8) -> tuple[dict, list]:
    import torch
    import torch.nn.functional as F

    num = den = kl = nll = 0.0
    ntok = npred = 0
    outs = []
    with torch.no_grad():
        for b in range(0, ids.shape[0], bs):
            x = ids[b : b + bs]
            lq = logits_fn(x).float()
            outs.append(lq)
            nll += float(F.cross_entropy(lq[:, :-1].reshape(-1, lq.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            npred += x[:, 1:].numel()
            if fp_logits is not None:
                lf = fp_logits[b // bs]
                num += float((lq - lf).pow(2).sum())
                den += float(lf.pow(2).sum())
                lpf, lpq = F.log_softmax(lf, -1), F.log_softmax(lq, -1)
                kl += float((lpf.exp() * (lpf - lpq)).sum())
                ntok += x.numel()
    m = {"ppl": float(torch.tensor(nll / npred).exp())}
    if fp_logits is not None:
        m.update(rel_logits_error=(num / den) ** 0.5, kl=kl / ntok)
    return m, outs


def grid_check(dense_dir: Path, bits: int, gs: int) -> int:
    """Max number of distinct values in one quantization group of a decompressed weight (<= 2^bits)."""
    import torch
    from safetensors.torch import load_file

    w = load_file(str(dense_dir / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    g = w.shape[1] if gs == -1 else gs
    groups = w.reshape(w.shape[0], -1, g).reshape(-1, g)
    return max(int(torch.unique(groups[i]).numel()) for i in range(0, groups.shape[0], max(1, groups.shape[0] // 64)))


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker-dllmq":
        ap = argparse.ArgumentParser()
        for k in ("--model", "--calib", "--out", "--method"):
            ap.add_argument(k, required=True)
        for k, d in (("--group-size", 128), ("--threads", 1), ("--sequential", 1), ("--batch-size", 8),
                     ("--bits", 4)):
            ap.add_argument(k, type=int, default=d)
        ap.add_argument("--damp", type=float, default=0.01)
        ap.add_argument("--scale-search", default="mse")
        ap.add_argument("--dtype", default="auto", help="calibration compute dtype (weights quantized as stored)")
        return worker_dllmq(ap.parse_args(sys.argv[2:]))

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every tool (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per (tool, config); the median is reported")
    ap.add_argument("--train-steps", type=int, default=200, help="training steps for the FP model (0: random)")
    ap.add_argument("--no-gptqmodel", action="store_true", help="skip GPTQModel")
    ap.add_argument("--configs", default="g128,channel", help="comma list of g128 / g64 / channel")
    ap.add_argument("--variants", default=None,
                    help="comma list of dllmq variants to run (default: all; gptq is dllmq's defaults)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()

    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    import dllmq
    from dllmq.models.loading import load_model
    from dllmq.runtime.qlinear import force_kernel

    torch.set_num_threads(a.threads)
    ensure_venv("llmcompressor")
    tok_dir, ids_file = build_data()
    model_dir = build_model(tok_dir, ids_file, a.train_steps, a.threads)
    calib_file = WORK / "calib-ids.safetensors"
    from safetensors.torch import save_file

    ids_all = load_file(str(ids_file))
    save_file({"calib": ids_all["calib"].contiguous()}, str(calib_file))
    heldout = ids_all["heldout"]
    t_setup = time.time() - t_start

    fp = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fp_metrics, fp_logits = heldout_metrics(lambda x: fp(input_ids=x).logits, heldout)
    ours_fp = load_model(model_dir, dtype=torch.float32)
    with torch.no_grad():
        layout_diff = float((ours_fp(heldout[:2]) - fp(input_ids=heldout[:2]).logits).abs().max())
    del ours_fp
    log(f"FP ppl {fp_metrics['ppl']:.3f}; dllmq-vs-transformers FP max |logit diff| {layout_diff:.2e}")

    tools = [("llm-compressor", "gptq"), ("dllmq", "gptq"), ("dllmq", "gptq-fp32"), ("dllmq", "gptq-nonseq"),
             ("dllmq", "gptq-nonseq-bf16"), ("dllmq", "gptq-minmax"), ("dllmq", "rtn")]
    if a.variants:
        tools = [t for t in tools if t[0] != "dllmq" or t[1] in a.variants.split(",")]
    if not a.no_gptqmodel:
        tools.insert(1, ("GPTQModel", "gptq"))
    single: set[str] = set()  # variants run once (none by default)
    cfgs = {"g128": 128, "g64": 64, "channel": -1}
    rows = []
    for cname in a.configs.split(","):
        gs = cfgs[cname]
        runs: dict[tuple, list] = {t: [] for t in tools}
        failed: dict[tuple, str] = {}
        # Round robin (tool A run 1, tool B run 1, ..., tool A run 2, ...): slow drifts of the machine's
        # load (another job shares it) hit every tool alike instead of whichever ran last.
        for r in range(a.repeats):
            for tool, variant in tools:
                key = (tool, variant)
                if key in failed or (variant in single and r > 0):
                    continue
                out = WORK / "out" / f"{tool}-{variant}-{cname}"
                try:
                    res = run_tool(tool, variant, model_dir, calib_file, gs, out, a, dense=(r == 0))
                except Exception as e:  # a failing peer is reported, not fatal
                    log(f"{tool} {variant} {cname} FAILED: {e}")
                    failed[key] = str(e)[-2000:]
                    continue
                runs[key].append(res)
                log(f"{tool} {variant} {cname} run {r + 1}: {res['quant_seconds']:.2f} s wall, "
                    f"{res.get('quant_cpu_seconds', float('nan')):.2f} s CPU")
        for tool, variant in tools:
            key = (tool, variant)
            if key in failed:
                rows.append({"tool": tool, "variant": variant, "config": cname, "error": failed[key]})
                continue
            rs = runs[key]
            out = WORK / "out" / f"{tool}-{variant}-{cname}"
            row = {"tool": tool, "variant": variant, "config": cname,
                   "quant_seconds": statistics.median(r["quant_seconds"] for r in rs),
                   "quant_cpu_seconds": statistics.median(r["quant_cpu_seconds"] for r in rs),
                   "quant_seconds_all": [round(r["quant_seconds"], 3) for r in rs],
                   "quant_cpu_seconds_all": [round(r["quant_cpu_seconds"], 3) for r in rs],
                   "save_seconds": statistics.median(r.get("save_seconds", 0.0) for r in rs),
                   "info": {k: v for k, v in rs[0].items() if not k.startswith(("quant_seconds", "quant_cpu"))}}
            if tool == "dllmq":
                q = dllmq.load(out, dtype=torch.float32)
                with force_kernel("dequant"):
                    m, _ = heldout_metrics(lambda x: q(x), heldout, fp_logits)
                del q
            else:
                dense = Path(str(out) + "-dense")
                row["max_distinct_values_per_group"] = grid_check(dense, 4, gs)
                q = LlamaForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
                m, _ = heldout_metrics(lambda x: q(input_ids=x).logits, heldout, fp_logits)
                del q
            row.update(m)
            rows.append(row)
            log(f"{tool} {variant} {cname}: rel err {m['rel_logits_error']:.5f}, KL {m['kl']:.6f}, ppl {m['ppl']:.3f}")

    # ---- table
    label = {"gptq": "GPTQ (defaults)", "gptq-nonseq": "GPTQ, sequential off", "rtn": "RTN (no calibration)",
             "gptq-minmax": "GPTQ, sequential off, min-max scales (as the peers)",
             "gptq-fp32": "GPTQ, float32 calibration compute (`--dtype float32`, the previous default)",
             "gptq-nonseq-bf16": "GPTQ, sequential off, bf16 compute"}
    cdesc = {"g128": "W4A16 sym, group 128", "g64": "W4A16 sym, group 64", "channel": "W4A16 sym, per channel"}
    lines = ["| tool | config | quant wall time (s) | time ratio vs llm-compressor | quant CPU time (s) | "
             "rel. logits error | KL (mean/token) | ppl |",
             "|---|---|---|---|---|---|---|---|",
             f"| full precision (transformers) | fp32 | - | - | - | 0 | 0 | {fp_metrics['ppl']:.3f} |"]
    for r in rows:
        name = f"{r['tool']} {label[r['variant']]}"
        if "error" in r:
            lines.append(f"| {name} | {cdesc[r['config']]} | failed: {r['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        ref = next((x for x in rows if x["tool"] == "llm-compressor" and x["config"] == r["config"] and "error" not in x),
                   None)
        ratio = f"{r['quant_seconds'] / ref['quant_seconds']:.2f}" if ref else "n/a"
        lines.append(f"| {name} | {cdesc[r['config']]} | {r['quant_seconds']:.2f} | {ratio} | "
                     f"{r['quant_cpu_seconds']:.2f} | {r['rel_logits_error']:.5f} | {r['kl']:.6f} | {r['ppl']:.3f} |")
    table = "\n".join(lines)
    versions = next((r["info"].get("versions") for r in rows if r.get("tool") == "llm-compressor" and "info" in r), {})
    notes = [
        f"Model: LlamaForCausalLM {MODEL_SPEC}, trained {a.train_steps} steps on CPython stdlib text "
        f"(byte-level BPE, vocab {DATA_SPEC['vocab']}). Calibration: {DATA_SPEC['n_calib']} x {DATA_SPEC['seq_len']} "
        f"token ids, identical for every tool; metrics on {DATA_SPEC['n_heldout']} x {DATA_SPEC['seq_len']} held-out "
        "ids from documents not used for training, tokenizer or calibration.",
        "GPTQ settings everywhere: int4 symmetric, damp 0.01, block 128, act-order off, lm_head "
        "in full precision, calibration batch 8, quantized inputs propagated to the next block.",
        f"Times: median of {a.repeats} fresh-process runs, interleaved round robin, "
        f"{a.threads} torch thread(s) per tool (GPTQModel additionally runs its own pool of 2 CPU workers), on a "
        "2-core CPU machine shared with another job; CPU time = process user+sys time of the same call. llm-compressor / GPTQModel: only oneshot() / quantize() is "
        "timed (no imports, loading or saving). dllmq: the whole pipeline.quantize() call, which also reads the "
        "FP shards and writes the packed checkpoint.",
        "dllmq 'GPTQ' is sequential (q/k/v, then o, then gate/up, then down, each group calibrated on the "
        "already quantized outputs: AutoGPTQ's true_sequential) and runs each block's forward once, in stages, "
        "keeping the state between groups; llm-compressor's sequential pipeline collects all Hessians of a "
        "decoder layer in one pass; 'sequential off' is the dllmq equivalent of that (one statistics pass, then "
        "one pass with the quantized weights).",
        f"dllmq vs transformers FP logits (layout check): max |diff| {layout_diff:.1e}.",
        "Scales: llm-compressor and GPTQModel use min-max scales absmax/7.5 (the positive extreme clipped to "
        "7/7.5 of itself); dllmq's min-max scale is absmax/7 (codes -7..7, nothing clipped) and its GPTQ default "
        "searches each group's clipping (ratios 1.0 down to 0.5, 20 steps, minimising sum |w - q(w)|^2.4) on the "
        "original weights before GPTQ runs. The min-max row shows dllmq's GPTQ without that search.",
        "Peer formats: llm-compressor stores fp32 scales (pack-quantized), like dllmq; GPTQModel stores fp16 "
        "scales and, with static_groups left at its default (off), computes a group's scale when GPTQ reaches "
        "the group (dllmq and llm-compressor: all group scales up front from the original weights).",
        "The model is small and only briefly trained, so all 4-bit errors are small; perplexity differences "
        "of a few tenths are within what any perturbation does here (RTN can land below FP). The relative "
        "logits error and KL are the discriminating columns.",
    ]
    if versions:
        notes.append("Peer versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; main venv torch "
                     f"{torch.__version__}, transformers {__import__('transformers').__version__}.")
    md = "# GPTQ side by side: dllmq vs peers\n\n" + table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare_gptq.md").write_text(md)
    (RESULTS / "compare_gptq.json").write_text(json.dumps(
        {"fp": fp_metrics, "rows": rows, "layout_max_abs_diff": layout_diff, "model": MODEL_SPEC, "data": DATA_SPEC,
         "threads": a.threads, "repeats": a.repeats, "train_steps": a.train_steps, "setup_seconds": t_setup,
         "total_seconds": time.time() - t_start, "command": " ".join(sys.argv)}, indent=2))
    log(f"wrote {RESULTS / 'compare_gptq.md'} ({time.time() - t_start:.0f} s total, setup {t_setup:.0f} s)")


if __name__ == "__main__":
    main()
