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
from ..runtime.kv_quant import install_kv_quant
from .capture import Runner, read_inputs, real_rows


def make_capture(blk: nn.Module, run: Runner, valid_of: Callable[[int], torch.Tensor | None], seed: int):
    def capture(names: list[str], max_tokens: int = 4096, reduce: bool = False):
        """Inputs of the named linears over the calibration batches (padding dropped). reduce=False: the
        rows, at most `max_tokens` (seeded subsample); reduce=True: {"absmax", "absmean", "tokens"} per
        channel over every token, plus, when `max_tokens` > 0, the same "rows" subsample, in one pass."""
        got: dict = {n: [] for n in names}
        red: dict = {n: None for n in names}

        def grab(n, x, valid, j):
            x = real_rows(x, valid)
            if reduce:
                xa = x.float().abs()
                mx = xa.amax(0).cpu() if len(xa) else torch.zeros(x.shape[-1])
                r, sm = red[n], xa.sum(0).cpu()
                red[n] = (mx, sm, len(xa)) if r is None else (torch.maximum(r[0], mx), r[1] + sm, r[2] + len(xa))
            if not reduce or max_tokens:
                got[n].append(x.float().cpu())

        read_inputs(blk, names, run, valid_of, grab)
        rows = {}
        for n, xs in got.items():
            x = torch.cat(xs) if xs else torch.empty(0)
            if max_tokens and x.shape[0] > max_tokens:
                x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]]
            rows[n] = x
        if not reduce:
            return rows
        out = {n: {"absmax": r[0], "absmean": r[1] / max(1, r[2]), "tokens": r[2]} for n, r in red.items() if r is not None}
        if max_tokens:
            for n in out:
                out[n]["rows"] = rows[n]
        return out

    return capture


def _install_kv(blk: nn.Module, arch, kv, prefix: str, specs: dict | None = None) -> None:
    """K/V quantization and QuaRot's q/k rotation (with IA-AQ's V clip once `specs` holds it), when any applies."""
    if kv is None or not (kv.enabled or kv.rotate_qk or any("v_clip" in s for s in (specs or {}).values())):
        return
    install_kv_quant(blk, arch, kv, rotate_qk=kv.rotate_qk, prefix=prefix,
                     transforms=None if specs is None else {prefix + n: s for n, s in specs.items()})


def transform_block(method, blk: nn.Module, index: int, prefix: str, arch, config, capture, device=None) -> dict:
    """Let `method` transform `blk` in place, installing its online transforms as it goes.
    Returns {local linear: spec}."""
    inst = online_transforms.Installer(blk, prefix, device)

    def install(local: str, tspec: dict, tens: dict) -> None:
        inst.add(prefix + local, tspec, {k: v.detach().clone() for k, v in tens.items()})

    # K/V quantization is dynamic: in place before any statistics, so every capture sees attention as it
    # will run; installed again at the end with the specs (IA-AQ's V clip)
    kv = getattr(getattr(method, "qcfg", None), "kv_cache", None)
    _install_kv(blk, arch, kv, prefix)
    with torch.no_grad():
        online = method.transform_block(blk, BlockContext(index, prefix, arch, config, capture, install))
    for local, (tspec, tens) in online.items():
        if prefix + local not in inst.built:  # specs may gain fields later (e.g. a clip ratio): no new module
            install(local, tspec, tens)
    specs = {n: s for n, (s, _) in online.items()}
    _install_kv(blk, arch, kv, prefix, specs)
    return specs
