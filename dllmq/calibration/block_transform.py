"""One block's method transform, with the statistics captured from the block exactly as it will run.

`transform_block` gives the method a `BlockContext` whose
  * `capture_inputs` replays the calibration batches through the block as it is *now* and returns the
    inputs of the named linears (rows, or per-channel max|x| / mean|x| over every real token);
  * `install` puts an online transform in place at once.
Methods install each transform as soon as they fold its inverse into the weights, so the statistics
of every later group come through the transforms of the earlier ones (never through folded weights
whose online half is missing). The pipeline and the tests drive the same code; only `run` differs
(shards + cached activations there, an in-memory model in tests).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..quantization.methods.base import BlockContext
from ..runtime import transforms as online_transforms
from .blocks import StopBlock

# run(on_batch) forwards every calibration batch through the block, calling on_batch(j) before batch j
Runner = Callable[[Callable[[int], None]], None]


def make_capture(blk: nn.Module, run: Runner, valid_of: Callable[[int], torch.Tensor | None], seed: int):
    def capture(names: list[str], max_tokens: int = 4096, reduce: bool = False):
        """Inputs of the named linears over the calibration batches (padding dropped). reduce=False: the
        rows, at most `max_tokens` (seeded subsample); reduce=True: {"absmax", "absmean", "tokens"} per
        channel over every token, without keeping the rows."""
        got: dict = {n: [] for n in names}
        red: dict = {n: None for n in names}
        seen: set[str] = set()
        cur: dict = {"valid": None}

        def grab(n, a):
            x = a[0].detach().reshape(-1, a[0].shape[-1])
            if cur["valid"] is not None:
                x = x[cur["valid"].to(x.device)]
            if reduce:
                xa = x.float().abs()
                mx = xa.amax(0).cpu() if len(xa) else torch.zeros(x.shape[-1])
                r, sm = red[n], xa.sum(0).cpu()
                red[n] = (mx, sm, len(xa)) if r is None else (torch.maximum(r[0], mx), r[1] + sm, r[2] + len(xa))
            else:
                got[n].append(x.float().cpu())
            seen.add(n)
            if len(seen) == len(names):  # the rest of the block is not needed
                raise StopBlock

        def on_batch(j):
            seen.clear()
            cur["valid"] = valid_of(j)

        hs = [blk.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: grab(n, a)) for n in names]
        try:
            run(on_batch)
        finally:
            for h in hs:
                h.remove()
        if reduce:
            return {n: {"absmax": r[0], "absmean": r[1] / max(1, r[2]), "tokens": r[2]}
                    for n, r in red.items() if r is not None}
        res = {}
        for n, xs in got.items():
            x = torch.cat(xs) if xs else torch.empty(0)
            if max_tokens and x.shape[0] > max_tokens:
                x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]]
            res[n] = x
        return res

    return capture


def transform_block(method, blk: nn.Module, index: int, prefix: str, arch, config, capture,
                    device=None) -> tuple[dict, set[str]]:
    """Let `method` transform `blk` in place, installing its online transforms as it goes.
    Returns ({local linear: spec}, {local linears whose transform is shared with another's})."""
    installed: dict[str, nn.Module] = {}

    def install(local: str, tspec: dict, tens: dict) -> None:
        own = online_transforms.owner_of(tspec)
        if own is not None:  # the owner's module, computed once per forward for all its consumers
            mod = installed[own[len(prefix):]]
            mod.consumers += 1
        else:
            mod = online_transforms.build(tspec, {k: v.detach().clone() for k, v in tens.items()})
            if mod is None:
                return
            mod = mod.to(device) if device is not None else mod
        online_transforms.install(blk.get_submodule(local), mod)
        installed[local] = mod

    # K/V quantization (and QuaRot's q/k rotation) is dynamic: in place before any statistics, so every
    # capture sees attention as it will run; installed again at the end with the specs (IA-AQ's V clip)
    kv = getattr(getattr(method, "qcfg", None), "kv_cache", None)
    if kv is not None and (kv.enabled or kv.rotate_qk):
        from ..runtime.kv_quant import install_kv_quant

        install_kv_quant(blk, arch, kv, rotate_qk=kv.rotate_qk, prefix=prefix)
    with torch.no_grad():
        online = method.transform_block(blk, BlockContext(index, prefix, arch, config, capture, install))
    for local, (tspec, tens) in online.items():
        if local not in installed:  # specs may gain fields later (e.g. a clip ratio): no new module then
            install(local, tspec, tens)
    specs = {n: s for n, (s, _) in online.items()}
    if kv is not None and (kv.enabled or kv.rotate_qk or any("v_clip" in s for s in specs.values())):
        from ..runtime.kv_quant import install_kv_quant

        install_kv_quant(blk, arch, kv, rotate_qk=kv.rotate_qk, transforms={prefix + n: s for n, s in specs.items()},
                         prefix=prefix)
    shared = {n for n, s in specs.items() if online_transforms.owner_of(s) is not None}
    return specs, shared
