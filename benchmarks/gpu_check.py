"""One-shot GPU check of dllmq's CUDA / Triton paths, for a borrowed GPU with a hard time budget.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR [--budget-s 240]
    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR --dry-run     # CPU, small shapes, < 60 s

Steps (each wrapped: an exception is recorded as {"status": "error"} and the next step runs; each
has a share of --budget-s, plus half of what earlier steps left unused, and skips its remaining items with
"skipped: time budget" once spent):

1. cuda_tests: the CUDA-marked tests (tests/test_kernels.py -k cuda), then tests/test_triton_kernels.py
   (interpreter tests + compile for sm80/sm90), in a pytest subprocess with a timeout.
2. triton_correctness: the Triton kernels compiled natively against the torch references.
3. qlinear_speed: each QuantLinear path vs bf16 F.linear at LLaDA-8B layer shapes.
4. quantize_4block: rtn / gptq / duquant through the pipeline on a 4-block LLaDA-8B-shaped random model
   (one subprocess per method, with a timeout).
5. bench: `dllmq bench` (evaluation.speed.bench) of the quantized 4-block models vs bf16, and the resident
   memory of a 32-block LLaDA-8B-shaped W4 g128 model built directly on the GPU.

Writes DIR/gpu_check.json and DIR/gpu_check.md after every step (a kill still leaves results).
Imports no dllmq module that needs lm_eval, datasets or compressed_tensors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("cuda_tests", "triton_correctness", "qlinear_speed", "quantize_4block", "bench")
FRACTIONS = {"cuda_tests": 60, "triton_correctness": 20, "qlinear_speed": 50, "quantize_4block": 70, "bench": 40}
LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288)
# the 4-block model: LLaDA-8B block shapes, a 4096-token vocabulary so the blocks dominate (benchmarks/kernels.py)
SMALL_VOCAB = dict(vocab_size=4096, embedding_size=4096, mask_token_id=4095, eos_token_id=4094, pad_token_id=4094)
SMALL_SPECIAL = {"<|startoftext|>": 4090, "<|start_header_id|>": 4091, "<|end_header_id|>": 4092,
                 "<|eot_id|>": 4093, "<|endoftext|>": 4094, "<|mdm_mask|>": 4095}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


class TimeBudget(Exception):
    """Raised inside a step when its budget is spent."""


class Step:
    """A step's record and its deadline."""

    def __init__(self, rec: dict, budget_s: float):
        self.rec = rec
        self.t0 = time.time()
        self.deadline = self.t0 + budget_s

    def left(self) -> float:
        return self.deadline - time.time()

    def check(self, what: str = "") -> None:
        if self.left() <= 0:
            raise TimeBudget(what)


class Checker:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "dry_run": self.dry, "budget_s": args.budget_s, "env": {},
                              "steps": {s: {"status": "pending"} for s in STEPS}}
        self.torch = None
        self.device = "cpu"

    # ------------------------------------------------------------------ output

    def write(self) -> None:
        try:
            (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))
        except Exception as e:  # never let reporting kill the run
            log(f"could not write json: {err_text(e)}")
        try:
            (self.out / "gpu_check.md").write_text(render_md(self.results))
        except Exception as e:
            log(f"could not write md: {err_text(e)}")

    # ------------------------------------------------------------------ driver

    def env(self) -> None:
        e = self.results["env"]
        e["python"] = sys.version.split()[0]
        e["platform"] = platform.platform()
        try:
            import torch

            self.torch = torch
            e["torch"] = torch.__version__
            e["cuda_available"] = torch.cuda.is_available()
            e["torch_cuda"] = torch.version.cuda
            if torch.cuda.is_available() and not self.dry:
                self.device = "cuda"
                e["gpu"] = torch.cuda.get_device_name(0)
                e["capability"] = list(torch.cuda.get_device_capability(0))
                e["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
        except Exception as ex:
            e["torch_error"] = err_text(ex)
        e["device"] = self.device
        e["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
        try:
            import triton

            e["triton"] = triton.__version__
        except Exception as ex:
            e["triton"] = None
            e["triton_error"] = err_text(ex)
        for mod in ("transformers", "tokenizers", "safetensors", "numpy"):
            try:
                e[mod] = __import__(mod).__version__
            except Exception as ex:
                e[mod] = f"unavailable ({type(ex).__name__})"
        self.write()

    def run(self) -> None:
        self.env()
        total = sum(FRACTIONS.values())
        carry = 0.0  # half of what earlier steps left unused goes to the next step
        for name in STEPS:
            share = self.args.budget_s * FRACTIONS[name] / total
            budget = share + 0.5 * carry
            rec = self.results["steps"][name]
            rec.clear()
            rec.update(status="running", budget_s=round(budget, 1))
            self.write()
            log(f"step {name} (budget {budget:.0f} s)")
            step = Step(rec, budget)
            try:
                if self.torch is None:
                    raise RuntimeError("torch did not import")
                status = getattr(self, "step_" + name)(step)
                rec["status"] = status or "ok"
            except TimeBudget as e:
                rec["status"] = "skipped: time budget"
                rec["skipped_at"] = str(e)
            except BaseException as e:  # noqa: BLE001 - the run must go on (KeyboardInterrupt stops it below)
                rec["status"] = "error"
                rec["error"] = err_text(e)
                rec["traceback"] = traceback.format_exc()[-3000:]
                if isinstance(e, KeyboardInterrupt):
                    rec["seconds"] = round(time.time() - step.t0, 2)
                    self.write()
                    raise
            rec["seconds"] = round(time.time() - step.t0, 2)
            carry = max(0.0, carry + share - rec["seconds"])
            log(f"step {name}: {rec['status']} in {rec['seconds']:.1f} s")
            self.cleanup()
            self.write()
        self.results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.write()

    def cleanup(self) -> None:
        try:
            gc.collect()
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        except Exception:
            pass

    def items(self, step: Step, rec_key: str, jobs, fn) -> str:
        """Run fn(job) for each job, recording each result (or its error) in rec[rec_key]; time-boxed."""
        out = step.rec.setdefault(rec_key, [])
        n_err = 0
        for i, job in enumerate(jobs):
            if step.left() <= 0:
                step.rec["skipped_items"] = len(jobs) - i
                return "skipped: time budget"
            t0 = time.time()
            try:
                r = fn(job)
            except Exception as e:
                label = " ".join(map(str, job)) if isinstance(job, tuple) else str(job)
                r = {"item": label, "status": "error", "error": err_text(e)}
                n_err += 1
                log(f"  item {job}: {r['error'][:200]}")
            r.setdefault("status", "ok")
            r["seconds"] = round(time.time() - t0, 3)
            out.append(r)
            self.write()
        if n_err and n_err == len(jobs):
            return "error"
        return f"partial: {n_err} item errors" if n_err else "ok"

    # ------------------------------------------------------------------ helpers

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_ms(self, fn, warmup: int = 2, reps: int = 10, max_s: float = 0.5) -> float:
        """Median milliseconds of fn(): CUDA events on the GPU, perf_counter on the CPU."""
        torch = self.torch
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        t_end = time.perf_counter() + max_s
        for i in range(reps):
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
            if i >= 2 and time.perf_counter() > t_end:
                break
        return statistics.median(times)

    def subprocess(self, cmd: list[str], timeout: float, env_extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(env_extra or {})
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
            return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "timed_out": False,
                    "seconds": round(time.time() - t0, 2)}
        except subprocess.TimeoutExpired as e:
            dec = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
            return {"rc": None, "stdout": dec(e.stdout), "stderr": dec(e.stderr), "timed_out": True,
                    "seconds": round(time.time() - t0, 2)}

    # ------------------------------------------------------------------ 1. cuda tests

    def step_cuda_tests(self, step: Step) -> str:
        if self.dry:
            # a tiny selection, so the parsing is exercised: on a CPU the CUDA tests are skipped
            runs = [("test_kernels -k cuda", ["tests/test_kernels.py", "-k", "int8_linear_cuda_pads_rows"])]
        else:
            runs = [("test_kernels -k cuda", ["tests/test_kernels.py", "-k", "cuda"]),
                    ("test_triton_kernels", ["tests/test_triton_kernels.py"])]

        def one(job):
            label, sel = job
            # -v: one line per test as it finishes, so a run killed by the timeout still tells what passed
            cmd = [sys.executable, "-m", "pytest", *sel, "-o", "addopts=", "-v", "-p", "no:cacheprovider", "-rfEs",
                   "--tb=short"]
            r = self.subprocess(cmd, step.left())
            text = r["stdout"] + r["stderr"]
            counts = {}
            summary = [ln for ln in text.splitlines() if re.match(r"^=+ .*\d+ (passed|failed|skipped|deselected|error)", ln)]
            if summary:
                for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", summary[-1]):
                    counts["error" if what.startswith("error") else what] = int(n)
            else:  # killed: count the per-test verdict lines
                for what in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
                    counts[what.lower()] = len(re.findall(rf"::\S+ {what}", text))
                counts["incomplete"] = True
            failed = [ln.split(" ")[0] for ln in text.splitlines() if re.search(r"::\S+ (FAILED|ERROR)", ln)]
            ok = r["rc"] in (0, 5) and not r["timed_out"]  # 5: nothing collected / all deselected
            return {"item": label, "status": "ok" if ok else ("timeout" if r["timed_out"] else "failed"),
                    "rc": r["rc"], "counts": counts, "failed_tests": failed[:50], "tail": text[-2500:]}

        status = self.items(step, "runs", runs, one)
        bad = [r for r in step.rec["runs"] if r.get("status") != "ok"]
        if status == "ok" and bad:
            status = "failed: " + ", ".join(f"{r['item']} ({r['status']})" for r in bad)
        return status

    # ------------------------------------------------------------------ 2. triton correctness

    def step_triton_correctness(self, step: Step) -> str:
        torch = self.torch
        from dllmq.quantization.rtn import rtn_quantize
        from dllmq.quantization.spec import ActSpec, WeightSpec
        from dllmq.quantization import grid as G
        from dllmq.runtime import triton_kernels as T
        from dllmq.runtime.qlinear import QuantLinear, force_kernel

        if T.triton is None:
            return "skipped: triton not installed"
        if not T.triton_available() or (self.device != "cuda" and not T._interpreting()):
            return "skipped: no CUDA device (and not interpreting)"
        dev = self.device
        if self.dry:
            qshapes = [(3, 256), (17, 384)]
            mshapes = [(3, 64, 256), (17, 32, 384)]
        else:
            qshapes = [(1, 4096), (64, 4096), (333, 12288), (2048, 4096)]
            mshapes = [(1, 4096, 4096), (64, 12288, 4096), (257, 4096, 12288), (2048, 4096, 4096)]
        g = torch.Generator(device=dev).manual_seed(0)

        def act(m, k, dtype=torch.bfloat16):
            x = torch.randn(m, k, device=dev, generator=g)
            x[:, 3] *= 40  # outlier channel
            return x.to(dtype)

        jobs = [("quantize_per_token", m, k, bits) for (m, k) in qshapes for bits in (8, 4)]
        jobs += [("quantize_per_token_smooth", m, k, 8) for (m, k) in qshapes[:2]]
        jobs += [("w4a8_linear", m, n, k, spec, abits) for (m, n, k) in mshapes
                 for spec, abits in (("g128", 8), ("channel", 8), ("channel", 4))]

        def one(job):
            kind = job[0]
            if kind.startswith("quantize_per_token"):
                _, m, k, bits = job
                x = act(m, k)
                aspec = ActSpec(bits)
                if kind.endswith("smooth"):
                    from dllmq.runtime.transforms import OnlineScale

                    s = (torch.rand(k, device=dev, generator=g) + 0.5).to(torch.bfloat16)
                    qt, st = T.quantize_per_token_triton(x, qmax=aspec.qmax, smooth=s)
                    qr, sr = G.quantize_per_token(OnlineScale(s)(x), aspec)
                else:
                    qt, st = T.quantize_per_token_triton(x, qmax=aspec.qmax)
                    qr, sr = G.quantize_per_token(x, aspec)
                self.sync()
                diff = (qt.int() - qr.int()).abs()
                return {"item": f"{kind} M={m} K={k} a{bits}", "code_mismatches": int((diff > 0).sum()),
                        "max_code_diff": int(diff.max()), "scale_max_rel_err": float(((st - sr).abs() / sr.abs()).max()),
                        "status": "ok" if int((diff > 0).sum()) == 0 else "mismatch"}
            _, m, n, k, strat, abits = job
            spec = WeightSpec(4, True, "group", 128) if strat == "g128" else WeightSpec(4, True, "channel", None)
            w = torch.randn(n, k, device=dev, generator=g) * 0.02
            ql = QuantLinear.from_quantized(rtn_quantize(w, spec), act_spec=ActSpec(abits), cache_dequantized=False).to(dev)
            del w
            x = act(m, k)
            with torch.no_grad():
                with force_kernel("triton_w4a8"):
                    yt = ql(x).float()
                with force_kernel("int8_act"):
                    yr = ql(x).float()
            self.sync()
            d = (yt - yr).abs()
            rel = float(d.norm() / yr.norm().clamp(min=1e-30))
            max_rel = float((d / yr.abs().clamp(min=1e-3)).max())
            ok = rel < 1e-2 and bool(torch.isfinite(yt).all())
            return {"item": f"w4a8_linear M={m} N={n} K={k} w4 {strat} a{abits}", "max_abs_err": float(d.max()),
                    "rel_err": rel, "max_rel_err": max_rel, "ref": "int8_act (torch._int_mm)",
                    "status": "ok" if ok else "mismatch"}

        status = self.items(step, "checks", jobs, one)
        bad = [r for r in step.rec["checks"] if r.get("status") not in ("ok",)]
        if status == "ok" and bad:
            status = f"mismatch: {len(bad)} of {len(step.rec['checks'])} checks"
        return status

    # ------------------------------------------------------------------ 3. QuantLinear speed

    def step_qlinear_speed(self, step: Step) -> str:
        torch = self.torch
        import torch.nn.functional as F

        from dllmq.quantization.rtn import rtn_quantize
        from dllmq.quantization.spec import ActSpec, WeightSpec
        from dllmq.runtime import triton_kernels as T
        from dllmq.runtime.qlinear import QuantLinear, force_kernel

        dev = self.device
        cuda = dev == "cuda"
        g128, ch = WeightSpec(4, True, "group", 128), WeightSpec(4, True, "channel", None)
        w8 = WeightSpec(8, True, "channel", None)
        # (label, weight spec, act spec, forced kernel on CUDA, forced kernel on CPU); None = automatic dispatch
        variants = [
            ("W4A16 g128 tinygemm", g128, ActSpec(), "int4_cuda", "int4_cpu"),
            ("W8A8 ch int8_act", w8, ActSpec(8), "int8_act", "int8_act"),
            ("W4A8 g128 triton", g128, ActSpec(8), "triton_w4a8", "triton_w4a8"),
            ("W4A8 ch triton", ch, ActSpec(8), "triton_w4a8", "triton_w4a8"),
            ("W4A4 ch triton", ch, ActSpec(4), "triton_w4a8", "triton_w4a8"),
            ("W4A8 ch int8_act", ch, ActSpec(8), "int8_act", "int8_act"),
            ("W4A8 asym ch auto (DuQuant)", WeightSpec(4, False, "channel", None), ActSpec(8, symmetric=False),
             None, None),
        ]
        has_triton = T.triton_available() and (cuda or T._interpreting())
        if self.dry:
            shapes, rows = [(512, 256)], [1, 16]
            if not has_triton:
                variants = [v for v in variants if v[3] != "triton_w4a8"]
        else:
            shapes, rows = [(4096, 4096), (12288, 4096), (4096, 12288)], [1, 8, 64, 512, 2048, 8192]
        step.rec["variants"] = [v[0] for v in variants]
        step.rec["note"] = "ratio = bf16 F.linear time / path time (>1 = faster than bf16)"
        out = step.rec.setdefault("rows", [])
        n_err = 0
        for n, k in shapes:
            try:
                w = torch.randn(n, k, device=dev) * 0.02
                wb = w.to(torch.bfloat16)
                layers = {}
                for label, spec, aspec, fc, fcpu in variants:
                    try:
                        layers[label] = (QuantLinear.from_quantized(rtn_quantize(w, spec), act_spec=aspec,
                                                                    cache_dequantized=False).to(dev),
                                         fc if cuda else fcpu)
                    except Exception as e:
                        layers[label] = (None, err_text(e))
                del w
            except Exception as e:
                out.append({"shape": f"{k}->{n}", "error": err_text(e)})
                n_err += 1
                continue
            for m in rows:
                if step.left() <= 0:
                    step.rec["skipped_at"] = f"{k}->{n} rows {m}"
                    return "skipped: time budget"
                row = {"shape": f"{k}->{n}", "rows": m}
                try:
                    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                    with torch.no_grad():
                        base = self.time_ms(lambda: F.linear(x, wb))
                    row["bf16_ms"] = base
                except Exception as e:
                    row["error"] = err_text(e)
                    out.append(row)
                    n_err += 1
                    continue
                for label, (ql, force) in layers.items():
                    if step.left() <= 0:
                        break
                    if ql is None:
                        row[label] = {"error": force}
                        continue
                    try:
                        with torch.no_grad(), force_kernel(force):
                            kern = ql.kernel_for(x)
                            t = self.time_ms(lambda: ql(x))
                        row[label] = {"ms": t, "ratio": base / t, "kernel": kern}
                    except Exception as e:
                        row[label] = {"error": err_text(e)}
                        n_err += 1
                out.append(row)
                log(f"  {k}->{n} rows {m}: bf16 {base:.3f} ms; " + ", ".join(
                    f"{lb} {v['ratio']:.2f}x" for lb, v in row.items() if isinstance(v, dict) and "ratio" in v))
                self.write()
            del layers, wb
            self.cleanup()
        return f"partial: {n_err} errors" if n_err else "ok"

    # ------------------------------------------------------------------ 4. quantize a 4-block model

    def write_model(self, path: Path, n_layers: int, sizes: dict) -> Path:
        """A random LLaDA-layout folder (real config field names), weights generated on the device."""
        torch = self.torch
        from safetensors.torch import save_file

        from dllmq.models.llada import LLADA
        from dllmq.models.loading import build_empty
        from dllmq.models.tiny import LLADA_CHAT_TEMPLATE, byte_tokenizer, llada_config

        path.mkdir(parents=True, exist_ok=True)
        raw = llada_config(n_layers=n_layers, **sizes)
        (path / "config.json").write_text(json.dumps(raw, indent=2))
        skel = build_empty(LLADA, LLADA.parse_config(raw))
        g = torch.Generator(device=self.device).manual_seed(0)
        state = {}
        for name, p in skel.state_dict().items():
            t = torch.randn(tuple(p.shape), device=self.device, generator=g)
            t = (1.0 + 0.1 * t) if name.endswith("norm.weight") or name.endswith("ln_f.weight") else 0.05 * t
            state[name] = t.to(torch.bfloat16).cpu().contiguous()
        del skel
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        del state
        special = SMALL_SPECIAL if raw["vocab_size"] == 4096 else None
        from dllmq.models.tiny import LLADA_SPECIAL

        byte_tokenizer(special or LLADA_SPECIAL, LLADA_CHAT_TEMPLATE, "<|startoftext|>", "<|endoftext|>",
                       "<|endoftext|>", "<|mdm_mask|>", path)
        return path

    def step_quantize_4block(self, step: Step) -> str:
        t0 = time.time()
        if self.dry:
            sizes = dict(d_model=256, n_heads=4, n_kv_heads=4, mlp_hidden_size=512, **SMALL_VOCAB)
            n_layers, samples, seq_len = 2, 4, 32
        else:
            sizes = dict(**LLADA_8B, **SMALL_VOCAB)
            n_layers, samples, seq_len = 4, 8, 128
        src = self.write_model(self.tmp / "src", n_layers, sizes)
        step.rec["model"] = {"n_layers": n_layers, **sizes, "write_seconds": round(time.time() - t0, 2)}
        step.rec["calibration"] = {"calib": "bundled", "samples": samples, "seq_len": seq_len, "mask": "none"}
        self.src = src
        self.quantized = {}
        dev = self.device
        jobs = [("rtn_w4_g128", "rtn", 4, 16, 128), ("gptq_w4_g128", "gptq", 4, 16, 128),
                ("duquant_w4a8", "duquant", 4, 8, None)]

        def one(job):
            label, method, w, a, gs = job
            out = self.tmp / label
            code = QUANTIZE_SNIPPET.format(src=str(src), out=str(out), method=method, w=w, a=a, gs=gs, dev=dev,
                                           samples=samples, seq_len=seq_len)
            r = self.subprocess([sys.executable, "-c", code], step.left())
            res = {"item": label, "method": method, "subprocess_seconds": r["seconds"]}
            lines = [ln for ln in r["stdout"].splitlines() if ln.startswith("GPU_CHECK_JSON ")]
            if r["rc"] == 0 and lines:
                res.update(json.loads(lines[-1][len("GPU_CHECK_JSON "):]))
                self.quantized[label] = out
                res["status"] = "ok"
            else:
                res["status"] = "timeout" if r["timed_out"] else "error"
                res["error"] = (r["stderr"] or r["stdout"])[-2500:]
            log(f"  {label}: {res['status']} {res.get('quantize_seconds', '')}")
            return res

        status = self.items(step, "methods", jobs, one)
        bad = [r for r in step.rec["methods"] if r.get("status") != "ok"]
        if status == "ok" and bad:
            status = "partial: " + ", ".join(f"{r['item']} {r['status']}" for r in bad)
        return status

    # ------------------------------------------------------------------ 5. bench

    def step_bench(self, step: Step) -> str:
        jobs = ["w4_32block_resident"] + [k for k in ("rtn_w4_g128", "duquant_w4a8", "gptq_w4_g128")
                                          if k in getattr(self, "quantized", {})]

        def one(job):
            if job == "w4_32block_resident":
                return self.resident_32block()
            return self.bench_one(job)

        return self.items(step, "items", jobs, one)

    def bench_one(self, label: str) -> dict:
        torch = self.torch
        from dllmq.evaluation.speed import bench

        if self.dry:
            kw = dict(batch=1, seq_len=32, gen_length=16, steps=4, block_length=16, prompt_len=8, rows=16, repeats=2,
                      memory=False)
        else:
            kw = dict(batch=1, seq_len=256, gen_length=64, steps=16, block_length=32, prompt_len=32, rows=512,
                      repeats=3, memory=True)
        res = bench(str(self.quantized[label]), against=str(self.src), fast=False, device=self.device,
                    dtype=torch.bfloat16, **kw)
        return {"item": label, "ratios": res.get("ratios"), "step_ms": res.get("step_ms"),
                "generation_tok_s": res.get("generation_tok_s"), "peak_bytes": res.get("peak_bytes"),
                "resident_weight_bytes": res.get("resident_weight_bytes"), "config": res.get("config"),
                "layers": [{k: v for k, v in x.items()} for x in res.get("layers", [])],
                "note": "ratios are quantized / bf16: step_time < 1 and generation_tok_s > 1 mean faster"}

    def resident_32block(self) -> dict:
        """LLaDA-8B-shaped model, W4 g128 QuantLinears with random packed weights built directly on the device."""
        torch = self.torch
        from dllmq.evaluation.report import resident_bytes
        from dllmq.evaluation.speed import step_inputs
        from dllmq.models.llada import LLADA
        from dllmq.models.loading import build_empty
        from dllmq.models.tiny import llada_config
        from dllmq.quantization.spec import WeightSpec
        from dllmq.runtime.qlinear import QuantLinear

        dev = self.device
        if self.dry:
            raw = llada_config(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, mlp_hidden_size=512, **SMALL_VOCAB)
        else:
            raw = llada_config(n_layers=32, **LLADA_8B)  # real vocabulary 126464, bf16 embedding and LM head
        cfg = LLADA.parse_config(raw)
        spec = WeightSpec(4, True, "group", 128)
        if dev == "cuda":
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            base_alloc = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        model = build_empty(LLADA, cfg)
        g = torch.Generator(device=dev).manual_seed(0)
        names = model.linear_names() if hasattr(model, "linear_names") else [
            f"{LLADA.blocks_path}.{i}.{n}" for i in range(cfg.num_layers) for n in LLADA.block_linears]
        names = [n for n in names if n.startswith(LLADA.blocks_path + ".")]
        for name in names:
            lin = model.get_submodule(name)
            ql = QuantLinear(lin.in_features, lin.out_features, spec, cache_dequantized=False, device=dev)
            ql.weight_packed.random_(generator=g)  # any int32 words are valid 4-bit codes
            ql.weight_scale.uniform_(0.001, 0.01, generator=g)
            ql.compute_dtype = torch.bfloat16
            model.set_submodule(name, ql)
        state = {}
        for name, p in model.named_parameters():
            t = torch.empty(tuple(p.shape), device=dev, dtype=torch.bfloat16)
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
            state[name] = t
        model.load_state_dict(state, assign=True, strict=False)
        del state
        model.eval()
        res = {"item": "w4_32block_resident", "n_layers": cfg.num_layers, "spec": "W4 g128 sym",
               "quantized_linears": len(names), "resident_weight_gib": resident_bytes(model) / 2**30}
        packed = sum(m.packed_nbytes() for m in model.modules() if isinstance(m, QuantLinear))
        res["packed_linear_gib"] = packed / 2**30
        if dev == "cuda":
            torch.cuda.synchronize()
            res["cuda_allocated_gib"] = (torch.cuda.memory_allocated() - base_alloc) / 2**30
        for seq in (256,) if self.dry else (256, 1024):
            x = step_inputs(model, 1, seq).to(dev)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                model.aligned_logits(x)  # warm-up: builds the int4 kernel states (cached on the modules)
                ms = self.time_ms(lambda: model.aligned_logits(x), warmup=0, reps=3, max_s=2.0)
            res[f"step_ms_seq{seq}"] = ms
            if dev == "cuda":
                res[f"peak_gib_seq{seq}"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**30
        qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
        res["kernel_cache_gib_after_steps"] = sum(m.cache_nbytes() for m in qls) / 2**30
        res["kernel_at_256_rows"] = qls[0].kernel_for(torch.zeros(256, qls[0].in_features, device=dev,
                                                                  dtype=torch.bfloat16))
        if dev == "cuda":
            res["allocated_after_step_gib"] = (torch.cuda.memory_allocated() - base_alloc) / 2**30
            peak = res.get("peak_gib_seq256", res["resident_weight_gib"])
            res["fits_8gb"] = bool(peak < 8.0)
            res["fits_8gb_note"] = ("peak allocated during a 1x256 step (packed weights + tinygemm int4 states "
                                    "cached by the step + activations) < 8 GiB")
        res["fits_8gb_weights_only"] = bool(res["resident_weight_gib"] < 8.0)
        if dev != "cuda":
            res["fits_8gb"] = res["fits_8gb_weights_only"]
        del model
        return res


QUANTIZE_SNIPPET = r"""
import json, time, torch
from pathlib import Path
from dllmq.checkpoint.format import QuantizationConfig
from dllmq.models.llada import LLADA
from dllmq.pipeline import CalibOptions, quantize
from dllmq.quantization.methods import get_method
from dllmq.quantization.spec import ActSpec, WeightSpec
from dllmq.runtime.kv_quant import default_kv_spec
m_cls = get_method({method!r})
gs = {gs!r}
if gs is None:
    gs = m_cls.default_group_size
wspec = WeightSpec(num_bits={w}, symmetric=m_cls.default_weight_symmetric,
                   strategy="channel" if gs is None else "group", group_size=gs)
a = {a}
aspec = ActSpec(num_bits=a, clip_ratio=m_cls.act_clip_for(a), symmetric=m_cls.default_act_symmetric)
qcfg = QuantizationConfig(method={method!r}, weights=wspec, activations=aspec, ignore=LLADA.default_ignore(),
                          kv_cache=default_kv_spec(m_cls, a, None))
dev = {dev!r}
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.time()
res = quantize({src!r}, qcfg, {out!r}, overwrite=True, device=dev,
               dtype=torch.bfloat16 if dev == "cuda" else torch.float32,
               calib=CalibOptions(calib="bundled", samples={samples}, seq_len={seq_len}, mask="none", batch_size=8),
               show_progress=False)
secs = time.time() - t0
errs = [r.rel_error for r in res.layers]
out = {{"quantize_seconds": secs, "weights": wspec.describe(), "act_bits": a, "act_symmetric": aspec.symmetric,
       "layers": len(res.layers), "mean_rel_error": sum(errs) / max(1, len(errs)), "max_rel_error": max(errs),
       "checkpoint_bytes": sum(f.stat().st_size for f in Path({out!r}).iterdir() if f.suffix == ".safetensors")}}
if dev == "cuda":
    out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
print("GPU_CHECK_JSON " + json.dumps(out), flush=True)
"""


# ---------------------------------------------------------------------- markdown


def _f(v, nd=3) -> str:
    if isinstance(v, bool) or v is None:
        return str(v) if v is not None else "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def render_md(res: dict) -> str:
    env = res.get("env", {})
    lines = ["# dllmq GPU check", "", f"started {res.get('started')}, finished {res.get('finished', '-')}, "
             f"dry run: {res.get('dry_run')}, budget {res.get('budget_s')} s", "",
             "| environment | value |", "|---|---|"]
    lines += [f"| {k} | {_f(v)} |" for k, v in env.items()]
    lines += ["", "## Steps", "", "| step | status | seconds | budget s |", "|---|---|---|---|"]
    steps = res.get("steps", {})
    for name, s in steps.items():
        lines.append(f"| {name} | {s.get('status')} | {_f(s.get('seconds'), 1)} | {_f(s.get('budget_s'), 0)} |")
    for name, s in steps.items():
        if s.get("error"):
            lines += ["", f"**{name} error:** `{s['error'][:500]}`"]

    ct = steps.get("cuda_tests", {})
    if ct.get("runs"):
        lines += ["", "## cuda_tests", "", "| run | status | counts |", "|---|---|---|"]
        lines += [f"| {r.get('item')} | {r.get('status')} | {r.get('counts', r.get('error', ''))} |" for r in ct["runs"]]
        for r in ct["runs"]:
            if r.get("status") != "ok" and r.get("tail"):
                lines += ["", f"{r.get('item')} output tail:", "", "```", r["tail"][-1500:], "```"]

    tc = steps.get("triton_correctness", {})
    if tc.get("checks"):
        lines += ["", "## triton_correctness", "", "| check | status | details |", "|---|---|---|"]
        for r in tc["checks"]:
            det = ", ".join(f"{k}={_f(v, 6) if isinstance(v, float) else v}" for k, v in r.items()
                            if k not in ("item", "status", "seconds"))
            lines.append(f"| {r.get('item')} | {r.get('status')} | {det[:300]} |")

    qs = steps.get("qlinear_speed", {})
    if qs.get("rows"):
        variants = qs.get("variants", [])
        lines += ["", "## qlinear_speed", "", qs.get("note", ""), "",
                  "| shape | rows | bf16 ms | " + " | ".join(variants) + " |", "|" + "---|" * (3 + len(variants))]
        for r in qs["rows"]:
            cells = []
            for v in variants:
                c = r.get(v)
                if not isinstance(c, dict):
                    cells.append("-")
                elif "ratio" in c:
                    cells.append(f"{c['ratio']:.2f}x [{c.get('kernel')}]")
                else:
                    cells.append("err")
            lines.append(f"| {r.get('shape')} | {r.get('rows', '-')} | {_f(r.get('bf16_ms'))} | " + " | ".join(cells) + " |")
        errs = {(r.get("shape"), v): r[v]["error"] for r in qs["rows"] for v in variants
                if isinstance(r.get(v), dict) and "error" in r[v]}
        for (shape, v), e in list(errs.items())[:8]:
            lines.append(f"- error {shape} {v}: `{e[:300]}`")

    qb = steps.get("quantize_4block", {})
    if qb.get("methods"):
        lines += ["", "## quantize_4block", "", f"model: {qb.get('model')}", "",
                  "| method | status | quantize s | peak CUDA GiB | weights | mean rel err | checkpoint MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in qb["methods"]:
            mib = r.get("checkpoint_bytes")
            lines.append(f"| {r.get('item')} | {r.get('status')} | {_f(r.get('quantize_seconds'), 1)} | "
                         f"{_f(r.get('peak_cuda_gib'), 2)} | {r.get('weights', '-')} | {_f(r.get('mean_rel_error'), 4)} | "
                         f"{_f(mib / 2**20 if mib else None, 1)} |")
        for r in qb["methods"]:
            if r.get("status") != "ok" and r.get("error"):
                lines += ["", f"{r.get('item')}:", "", "```", str(r["error"])[-1200:], "```"]

    bs = steps.get("bench", {})
    if bs.get("items"):
        lines += ["", "## bench", "", "| model | status | step time q/bf16 | generation tok/s q/bf16 | peak GiB q / bf16 |",
                  "|---|---|---|---|---|"]
        for r in bs["items"]:
            if r.get("item") == "w4_32block_resident":
                continue
            rt, pk = r.get("ratios") or {}, r.get("peak_bytes") or {}
            peak = " / ".join(_f(pk.get(k) / 2**30, 2) if pk.get(k) else "-" for k in ("quantized", "full precision"))
            lines.append(f"| {r.get('item')} | {r.get('status')} | {_f(rt.get('step_time'))} | "
                         f"{_f(rt.get('generation_tok_s'))} | {peak} |")
        for r in bs["items"]:
            if r.get("layers"):
                lines += ["", f"{r['item']} per layer ({r['layers'][0].get('rows')} rows):", "",
                          "| layer | shape | kernel | q/bf16 |", "|---|---|---|---|"]
                lines += [f"| {x.get('layer')} | {x.get('shape')} | {x.get('kernel')} | {_f(x.get('ratio'))} |"
                          for x in r["layers"]]
        for r in bs["items"]:
            if r.get("item") == "w4_32block_resident":
                lines += ["", f"{r.get('n_layers')}-block LLaDA-8B-shaped W4 g128 model built on the device:", "",
                          "| measure | value |", "|---|---|"]
                lines += [f"| {k} | {_f(v)} |" for k, v in r.items() if k != "item"]
        for r in bs["items"]:
            if r.get("status") == "error":
                lines.append(f"- {r.get('item')} error: `{str(r.get('error'))[:500]}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry-run", action="store_true", help="CPU, small shapes, Triton via its interpreter")
    ap.add_argument("--budget-s", type=float, default=240.0, help="total time budget of the steps (default 240)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by dllmq.runtime.triton_kernels)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    t0 = time.time()
    c = Checker(args)
    log(f"out {args.out}, dry run {args.dry_run}, budget {args.budget_s} s, tmp {c.tmp}")
    try:
        c.run()
    finally:
        import shutil

        shutil.rmtree(c.tmp, ignore_errors=True)
    log(f"done in {time.time() - t0:.1f} s; wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
