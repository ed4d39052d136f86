"""`dllmq bench`: speed and memory of a checkpoint against its full-precision model, measured in the same run.

Every timing alternates the two models (A B A B ...) and reports medians, so drift on a shared machine
(thermal, other processes) hits both alike; the tables give ratios, not just absolute times.

Measured:
* denoising step: one full-sequence forward at [batch, seq_len] with half the tokens masked (what every
  diffusion step costs);
* generation: tokens per second of the plain sampler and, with `fast`, of the cached parallel sampler;
* per layer type: each linear of the first block (and the LM head) on [rows, in] inputs, with the kernel
  QuantLinear chose for that shape;
* memory: resident weight bytes, and peak memory of a step (CUDA: max allocated; CPU: peak RSS of a fresh
  subprocess that loads the model and runs one step).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

from ..diffusion.generation import GenerationConfig, generate_ids
from ..runtime import native
from ..runtime.loader import load
from ..runtime.qlinear import QuantLinear
from .report import reference_for, resident_bytes


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict, repeats: int, device: str, warmup: int = 1, on_call=None) -> dict:
    """Median seconds of each callable, run in alternation (A B A B ...). `on_call()` after every call."""
    tick = on_call or (lambda: None)
    for _ in range(warmup):
        for f in fns.values():
            f()
            tick()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(_time(f, device))
            tick()
    return {k: statistics.median(v) for k, v in times.items()}


def step_inputs(model, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, min(vocab, 1000), (batch, seq_len), generator=g)
    ids[torch.rand(batch, seq_len, generator=g) < 0.5] = model.mask_token_id
    return ids


def layer_timings(q, fp, rows: int, repeats: int, device: str, dtype, on_call=None) -> list[dict]:
    """Each linear type of block 0 and the LM head: quantized vs full precision on [rows, in_features]."""
    out = []
    names = [f"{q.arch.blocks_path}.0.{n}" for n in q.arch.block_linears] + [q.arch.head_name]
    for name in names:
        try:
            lq, lf = q.get_submodule(name), fp.get_submodule(name)
        except AttributeError:
            continue
        in_f = getattr(lf, "in_features", None)
        if in_f is None:
            continue
        x = torch.randn(rows, in_f, dtype=dtype, device=device)
        with torch.no_grad():
            med = alternate({"q": lambda: lq(x), "fp": lambda: lf(x)}, repeats, device, on_call=on_call)
        kernel = lq.kernel_for(x) if isinstance(lq, QuantLinear) else "full precision"
        out.append({"layer": name.split(".")[-1] if name != q.arch.head_name else "lm_head",
                    "shape": f"{lf.out_features}x{in_f}", "rows": rows, "kernel": kernel,
                    "fp_ms": 1e3 * med["fp"], "q_ms": 1e3 * med["q"], "ratio": med["q"] / med["fp"]})
    return out


def peak_rss_subprocess(model: str, device: str, dtype: str, batch: int, seq_len: int) -> int | None:
    """Peak RSS (bytes) of a fresh process that loads `model` and runs one denoising step; None on failure."""
    code = ("import sys, torch; from dllmq.runtime.loader import load; "
            "from dllmq.runtime.memory import peak_rss_bytes; "
            "from dllmq.evaluation.speed import step_inputs; "
            f"m = load({model!r}, device={device!r}, dtype=getattr(torch, {dtype!r})); "
            f"x = step_inputs(m, {batch}, {seq_len}).to({device!r}); "
            "torch.no_grad()(m.aligned_logits)(x); "
            "print(peak_rss_bytes())")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def bench(model: str, against: str | None = None, batch: int = 1, seq_len: int = 256, gen_length: int = 64,
          steps: int = 64, block_length: int = 32, prompt_len: int = 32, rows: int = 256, repeats: int = 5,
          fast: bool = True, memory: bool = True, device: str = "cpu", dtype=None, progress=None,
          show_progress: bool = False) -> dict:
    """Step, generation, per-layer and memory measurements of `model` against its full-precision reference, both in
    `dtype` (default: the runtime's, `runtime.loader.default_dtype`).
    `progress(stage)` is called at each stage; `show_progress` draws a bar (stderr, a terminal) advanced per timed
    call, so its ETA follows the work."""
    from ..ui import bar

    if dtype is None:
        from ..runtime.loader import default_dtype

        dtype = default_dtype(device)
    with bar("bench", total=None, info="loading", show=show_progress) as pb:
        return _bench(model, against, batch, seq_len, gen_length, steps, block_length, prompt_len, rows, repeats,
                      fast, memory, device, dtype, progress, pb)


def _bench(model, against, batch, seq_len, gen_length, steps, block_length, prompt_len, rows, repeats, fast, memory,
           device, dtype, progress, pb) -> dict:
    ref = reference_for(model, against)
    entries = {"quantized": model}
    if ref:
        entries["full precision"] = ref
    models = {k: load(v, device=device, dtype=dtype).eval() for k, v in entries.items()}
    any_m = next(iter(models.values()))
    res: dict = {"models": entries, "config": {"batch": batch, "seq_len": seq_len, "gen_length": gen_length,
                                               "steps": steps, "block_length": block_length, "rows": rows,
                                               "repeats": repeats, "device": device, "dtype": str(dtype),
                                               "torch_threads": torch.get_num_threads(),
                                               "native_cpu_kernels": native.status(),
                                               "cpu": native.cpu_description()}}

    def tick(what):
        pb.update(info=what)
        if progress:
            progress(what)

    def call():
        pb.advance()

    n, r2 = len(models), max(1, repeats // 2)
    n_layers = (len(any_m.arch.block_linears) + 1) if ref else 0
    pb.update(total=(1 + repeats) * n + (1 + r2) * n * (2 if fast else 1) + n_layers * 2 * (1 + repeats)
              + (n if memory else 0))

    # denoising step
    tick("denoising step")
    x = step_inputs(any_m, batch, seq_len).to(device)
    with torch.no_grad():
        med = alternate({k: (lambda m=m: m.aligned_logits(x)) for k, m in models.items()}, repeats, device,
                        on_call=call)
    res["step_ms"] = {k: 1e3 * v for k, v in med.items()}

    # generation
    tick("generation")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, min(any_m.config.vocab_size, 1000), (batch, prompt_len), generator=g).to(device)
    plain = GenerationConfig(steps=steps, gen_length=gen_length, block_length=block_length)
    runs = {f"{k}": (lambda m=m: generate_ids(m, prompt, None, plain)) for k, m in models.items()}
    if fast:
        fcfg = GenerationConfig.fast_defaults(steps=steps, gen_length=gen_length, block_length=block_length)
        runs.update({f"{k} --fast": (lambda m=m: generate_ids(m, prompt, None, fcfg)) for k, m in models.items()})
    med = alternate(runs, r2, device, on_call=call)
    res["generation_tok_s"] = {k: batch * gen_length / v for k, v in med.items()}

    # per layer type
    if ref:
        tick("layers")
        res["layers"] = layer_timings(models["quantized"], models["full precision"], rows, repeats, device, dtype,
                                      on_call=call)

    # memory
    tick("memory")
    res["resident_weight_bytes"] = {k: resident_bytes(m) for k, m in models.items()}
    peak = {}
    if memory:
        if device.startswith("cuda"):
            for k, m in models.items():
                torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    m.aligned_logits(x)
                peak[k] = torch.cuda.max_memory_allocated()
                call()
        else:
            del models
            for k, name in entries.items():
                peak[k] = peak_rss_subprocess(name, device, str(dtype).replace("torch.", ""), batch, seq_len)
                call()
    res["peak_bytes"] = peak
    res["ratios"] = ratios(res) if ref else {}
    return res


def ratios(res: dict) -> dict:
    """Raw ratios, quantized / full precision: for times (step_time) and bytes > 1 means slower / larger; for
    throughput (generation_tok_s, fast_*) > 1 means faster. `dllmq bench` prints them in words
    (time_ratio_text, throughput_ratio_text, size_ratio_text)."""
    out = {"step_time": res["step_ms"]["quantized"] / res["step_ms"]["full precision"],
           "resident_weight_bytes": res["resident_weight_bytes"]["quantized"] /
           res["resident_weight_bytes"]["full precision"]}
    tps = res["generation_tok_s"]
    out["generation_tok_s"] = tps["quantized"] / tps["full precision"]
    if "quantized --fast" in tps:
        out["fast_vs_plain_quantized"] = tps["quantized --fast"] / tps["quantized"]
        out["fast_quantized_vs_plain_fp"] = tps["quantized --fast"] / tps["full precision"]
    pk = res.get("peak_bytes", {})
    if pk.get("quantized") and pk.get("full precision"):
        out["peak_bytes"] = pk["quantized"] / pk["full precision"]
    return out


# -- display: ratios in words, the direction spelled out (the JSON keeps the raw quantized / full-precision ratios)

def _ratio_text(q_over_fp: float | None, less: str, more: str) -> str:
    """`q_over_fp` in words: '2.00× <less>' below 1, '1.50× <more>' above, 'same' when it rounds to 1."""
    if q_over_fp is None or q_over_fp <= 0:
        return "-"
    if round(q_over_fp, 2) == 1.0:
        return "same (1.00×)"
    return f"{1 / q_over_fp:.2f}× {less}" if q_over_fp < 1 else f"{q_over_fp:.2f}× {more}"


def time_ratio_text(q_over_fp: float | None) -> str:
    """A time ratio quantized / full precision: > 1 means the quantized model is slower."""
    return _ratio_text(q_over_fp, "faster", "slower")


def throughput_ratio_text(q_over_fp: float | None) -> str:
    """A throughput ratio (tokens/s) quantized / full precision: > 1 means the quantized model is faster."""
    return "-" if q_over_fp is None or q_over_fp <= 0 else time_ratio_text(1 / q_over_fp)


def size_ratio_text(q_over_fp: float | None) -> str:
    """A memory ratio quantized / full precision: < 1 means the quantized model is smaller."""
    return _ratio_text(q_over_fp, "smaller", "larger")
