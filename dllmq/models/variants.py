"""Function-preserving variants of a model, for testing weight-activation methods.

`inject_outliers` gives a model LLaDA-8B-like activation outliers without changing what it
computes: for chosen channels c it multiplies the producer's output (a norm weight, or a
linear's output rows) by `factor` and divides the consumers' input columns by `factor`. With a
power-of-two factor this is exact even in bf16. The default sites are the FFN down-projection
input (where LLaDA-8B's massive outliers sit) and the attention input.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .base import DiffusionLM


@torch.no_grad()
def inject_outliers(model: DiffusionLM, channels: int = 4, factor: float = 64.0, seed: int = 0,
                    sites: tuple[str, ...] = ("mlp_down", "attn_in")) -> dict:
    """Scale `channels` random channels per site and block by `factor`; returns what was done."""
    from ..quantization.awq import fold_scales

    g = torch.Generator().manual_seed(seed)
    arch = model.arch
    feeds = {}
    for f in arch.feeds:
        if "mlp_down" in sites and f.targets == (arch.mlp_down,):
            feeds["mlp_down"] = f
        if "attn_in" in sites and f.kind == "norm" and any(t.endswith("q_proj") for t in f.targets):
            feeds["attn_in"] = f
    done = {}
    for i, blk in enumerate(model.blocks):
        for site, f in feeds.items():
            nexts = [blk.get_submodule(t) for t in f.targets]
            k = nexts[0].weight.shape[1]
            idx = torch.randperm(k, generator=g)[:channels]
            s = torch.ones(k)
            s[idx] = 1.0 / factor  # fold_scales divides the producer by s, multiplies consumers by s
            fold_scales(blk.get_submodule(f.source), nexts, s.to(nexts[0].weight.device))
            done[f"{arch.blocks_path}.{i}.{f.source}"] = [int(c) for c in idx]
    return done


def cache_dir() -> Path:
    return Path(os.environ.get("DLLMQ_CACHE", Path.home() / ".cache" / "dllmq"))


def write_outlier_variant(model: DiffusionLM, src: Path, out: Path, **kw) -> Path:
    """Inject outliers into `model` (loaded from `src`, fp32) and write a full-precision folder (same format) at
    `out`, atomically. `dllmq.models.loading.outlier_variant(src, out)` loads and calls this; the model comes in
    as an argument so that this module never imports the loader (no import cycle)."""
    info = inject_outliers(model, **kw)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    (tmp / "outliers.json").write_text(json.dumps({"source": str(src), "options": kw, "channels": info}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
