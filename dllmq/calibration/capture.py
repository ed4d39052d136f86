"""The one way calibration reads a block's linear inputs: forward pre-hooks on the named linears while the
calibration batches run through the block, padding dropped, and the block's forward stopped (StopBlock) as soon
as every named linear has seen its batch, so reading the inputs of q/k/v costs a norm, not a whole block.

Two consumers: the method's transform step (`block_transform.make_capture`: rows or per-channel statistics) and the
pipeline's statistics collection (`pipeline._collect`: GPTQ Hessians and other accumulators).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .blocks import StopBlock

# run(on_batch) forwards every calibration batch through the block, calling on_batch(j) before batch j
Runner = Callable[[Callable[[int], None]], None]
# consume(name, x, valid, j): x the linear's raw input tensor, valid its real-token rows (None: all), j the batch
Consumer = Callable[[str, torch.Tensor, "torch.Tensor | None", int], None]


def real_rows(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] as rows [T, K] without the padding rows (`valid`: bool over the flattened rows)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    return rows if valid is None else rows[valid.to(rows.device)]


def read_inputs(blk: nn.Module, names: list[str], run: Runner, valid_of: Callable[[int], torch.Tensor | None],
                consume: Consumer) -> None:
    """Run the batches through `blk` (`run`), handing each named linear's input of every batch to `consume`."""
    cur: dict = {"j": 0, "valid": None, "seen": set()}

    def hook(n):
        def fn(mod, args):
            consume(n, args[0], cur["valid"], cur["j"])
            cur["seen"].add(n)
            if len(cur["seen"]) == len(names):  # the rest of the block is not needed for this batch
                raise StopBlock
        return fn

    def on_batch(j):
        cur.update(j=j, valid=valid_of(j), seen=set())

    hs = [blk.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            run(on_batch)
    finally:
        for h in hs:
            h.remove()
