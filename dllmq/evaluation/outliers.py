"""Activation outlier statistics at every linear input.

For each linear (full precision or QuantLinear) a forward pre-hook sees its input x [T, K]
and accumulates: max |x|, per-channel max |x| (-> top channels and the ratio of the largest
channel to the median channel), excess kurtosis of the values, and the share of tokens that
carry an outlier (any |x| > `k_sigma` x the layer's RMS). LLaDA-8B's FFN down-projection input
is where the dLLM papers find massive outliers spread over many tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Acc:
    chan_max: torch.Tensor | None = None
    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    s4: float = 0.0
    tokens: int = 0
    outlier_tokens: int = 0
    rows: list = field(default_factory=list)


@dataclass
class LayerStats:
    name: str
    max_abs: float
    top_channels: list[int]
    top_values: list[float]
    channel_ratio: float  # largest channel max / median channel max
    kurtosis: float  # excess kurtosis of all input values
    outlier_token_share: float
    tokens: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    from ..runtime.qlinear import QuantLinear

    blocks = model.arch.blocks_path + "."
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and n.startswith(blocks)}


@torch.no_grad()
def activation_stats(model: nn.Module, batches: list[torch.Tensor], k_sigma: float = 10.0,
                     attention_masks: list | None = None, show_progress: bool = False,
                     label: str = "inspect") -> list[LayerStats]:
    """Progress: one unit per batch, advanced block by block, on the active display (dllmq.ui) or, with
    `show_progress`, on one of its own."""
    from ..ui import bar

    with bar(label, total=len(batches), info="", show=show_progress) as pb:
        return _activation_stats(model, batches, k_sigma, attention_masks, pb)


def _activation_stats(model, batches, k_sigma, attention_masks, pb) -> list[LayerStats]:
    mods = _linear_modules(model)
    accs = {n: _Acc() for n in mods}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            a = accs[name]
            cm = x.abs().amax(0)
            a.chan_max = cm if a.chan_max is None else torch.maximum(a.chan_max, cm)
            a.n += x.numel()
            a.s1 += float(x.sum())
            a.s2 += float((x * x).sum())
            a.rows.append(x.abs().amax(1))
            mu = x.mean()
            a.s4 += float(((x - mu) ** 4).sum())
            a.tokens += x.shape[0]
        return fn

    handles = []
    for n, m in mods.items():
        t = getattr(m, "input_transform", None)
        if t is not None:  # record what the layer multiplies: its input after the online transform
            handles.append(t.register_forward_hook(lambda mod, args, out, fn=hook(n): fn(mod, (out,))))
        else:
            handles.append(m.register_forward_pre_hook(hook(n)))
    if pb:
        blocks = list(model.get_submodule(model.arch.blocks_path))
        cur = [0]
        for k, blk in enumerate(blocks):
            handles.append(blk.register_forward_hook(
                lambda mod, args, out, k=k: pb.advance(1 / len(blocks), info=f"batch {cur[0] + 1}/{len(batches)}, "
                                                                           f"block {k + 1}/{len(blocks)}")))
    try:
        for i, b in enumerate(batches):
            am = attention_masks[i] if attention_masks else None
            if pb:
                cur[0] = i
            model(b.to(next(model.parameters()).device), am)
            pb.update(completed=i + 1)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, a in accs.items():
        if a.n == 0:
            continue
        mean = a.s1 / a.n
        var = max(a.s2 / a.n - mean * mean, 1e-30)
        rms = (a.s2 / a.n) ** 0.5
        row_max = torch.cat(a.rows)
        top = torch.topk(a.chan_max, k=min(3, a.chan_max.numel()))
        out.append(LayerStats(
            name=name,
            max_abs=float(a.chan_max.max()),
            top_channels=[int(i) for i in top.indices],
            top_values=[float(v) for v in top.values],
            channel_ratio=float(a.chan_max.max() / a.chan_max.median().clamp(min=1e-12)),
            kurtosis=a.s4 / a.n / (var * var) - 3.0,
            outlier_token_share=float((row_max > k_sigma * rms).float().mean()),
            tokens=a.tokens,
        ))
    return out


def summarize_by_type(stats: list[LayerStats], arch) -> list[dict]:
    """Per linear type (q_proj, ff_out, ...): worst max |x|, mean channel ratio, mean outlier share."""
    rows = []
    for lin in arch.block_linears:
        s = [x for x in stats if x.name.endswith("." + lin)]
        if not s:
            continue
        worst = max(s, key=lambda x: x.max_abs)
        block = int(worst.name[len(arch.blocks_path) + 1:].split(".")[0])
        rows.append({"linear": lin, "max_abs": worst.max_abs, "worst_block": block,
                     "channel_ratio": sum(x.channel_ratio for x in s) / len(s),
                     "kurtosis": sum(x.kurtosis for x in s) / len(s),
                     "outlier_token_share": sum(x.outlier_token_share for x in s) / len(s)})
    return rows


def plot_stats(before: list[LayerStats], after: list[LayerStats] | None, arch, out_dir, title: str) -> list:
    """PNG plots like the QDLM paper's: max |x| per block for each linear input type, before/after a transform."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import UserError

        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for lin in arch.block_linears:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for label, stats in (("before", before), ("after", after)):
            if not stats:
                continue
            s = sorted((x for x in stats if x.name.endswith("." + lin)),
                       key=lambda x: int(x.name[len(arch.blocks_path) + 1:].split(".")[0]))
            ax.plot(range(len(s)), [x.max_abs for x in s], marker="o", label=f"max |x| {label}")
            ax.plot(range(len(s)), [x.max_abs / max(x.channel_ratio, 1e-9) for x in s], ls="--",
                    label=f"median channel max {label}")
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_title(f"{title}: input of {lin}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        f = out_dir / f"{lin.replace('.', '_')}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files
