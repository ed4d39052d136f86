"""Run calibration data through a model one transformer block at a time.

Only the current block is materialised on the compute device, with its tensors read from the
safetensors shards; everything else stays on the meta device. The hidden states between blocks
are cached on CPU, or on disk (--offload-dir) one file per batch, so peak memory is one block
plus one batch of activations, independent of depth.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.base import DiffusionLM
from ..models.loading import ShardReader
from .batch import CalibBatch


class HiddenCache:
    """Per-batch hidden states, in memory or as safetensors files in a folder."""

    def __init__(self, n: int, offload_dir: Path | None = None, tag: str = "h"):
        self.n = n
        self.dir = Path(offload_dir) if offload_dir else None
        self.tag = tag
        self._mem: list[torch.Tensor | None] = [None] * n
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, i: int) -> Path:
        return self.dir / f"{self.tag}-{i:05d}.safetensors"  # type: ignore[operator]

    def set(self, i: int, h: torch.Tensor) -> None:
        h = h.detach().to("cpu").contiguous()
        if self.dir:
            save_file({"h": h}, str(self._file(i)))
        else:
            self._mem[i] = h

    def get(self, i: int) -> torch.Tensor:
        if self.dir:
            return load_file(str(self._file(i)))["h"]
        t = self._mem[i]
        assert t is not None, f"hidden state {i} not computed"
        return t


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so resident memory after a
    block is released does not creep up with depth. A no-op where malloc_trim does not exist."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StopBlock(Exception):
    """Raised by a forward hook to end a block's forward early: statistics passes only need the
    inputs of some linears, not the block's output (the rest of the block is skipped)."""


class BlockStream:
    """A model skeleton on the meta device plus a shard reader that fills one block at a time."""

    def __init__(self, skeleton: DiffusionLM, reader: ShardReader, device: str, dtype: torch.dtype):
        self.model = skeleton
        self.reader = reader
        self.device = device
        self.dtype = dtype
        self.arch = skeleton.arch
        self._contexts: dict[int, tuple] = {}

    def prefix(self, i: int) -> str:
        return f"{self.arch.blocks_path}.{i}."

    def materialize(self, i: int) -> nn.Module:
        blk = self.model.blocks[i]  # on the meta device: every tensor is assigned below (no to_empty, whose
        p = self.prefix(i)          # meta-tensor path imports sympy: half a second per run)
        raw = {n: self.reader.get(p + n) for n in blk.state_dict()}
        self.src_dtypes = {p + n: t.dtype for n, t in raw.items()}  # written back in the original dtype
        # assign=True: the block really computes in self.dtype (copying into the skeleton's fp32
        # parameters would only round the weights and keep fp32 compute); copy=True: never alias the
        # reader's tensors, which methods then modify in place
        blk.load_state_dict({n: t.to(device=self.device, dtype=self.dtype, copy=True) for n, t in raw.items()}, strict=True,
                            assign=True)
        left = [n for n, t in [*blk.named_parameters(), *blk.named_buffers()] if t.is_meta]
        if left:  # a tensor outside the state dict (a non-persistent buffer) would stay unallocated
            raise RuntimeError(f"block {i}: {left} not in the checkpoint's state dict")
        return blk.eval()

    def stored(self, name: str, t: torch.Tensor, rewritten: bool) -> torch.Tensor:
        """Tensor `name` of the current block as it goes to the checkpoint, in its stored dtype. When the
        method did not rewrite the block and the block computes in a lower precision than the shards, the
        shard's own tensor is returned, not a rounded copy."""
        src = self.src_dtypes.get(name, t.dtype)
        if not rewritten and src != t.dtype:
            return self.reader.get(name)
        return t.to(src)

    def release(self, i: int) -> None:
        self.model.blocks[i].to("meta")
        _return_freed_memory()

    @torch.no_grad()
    def embed(self, batches: list[CalibBatch], cache: HiddenCache, wte: torch.Tensor | None = None) -> None:
        if wte is None:
            wte = self.reader.get(f"{self.arch.embed_name}.weight")
        wte = wte.to(device=self.device, dtype=self.dtype)
        top = max(int(b.ids.max()) for b in batches) if batches else -1
        if top >= wte.shape[0]:
            from ..errors import UserError

            raise UserError(f"the tokenizer produced token id {top}, beyond the model's embedding table "
                            f"({wte.shape[0]} rows): the tokenizer does not belong to this model; fix its files")
        for j, b in enumerate(batches):
            cache.set(j, F.embedding(b.ids.to(self.device), wte))
        del wte

    def context(self, b: CalibBatch) -> dict:
        """The batch's RoPE tables and key mask (fp32 tables, as LLaDA computes them). They depend only on the batch,
        so they are computed once and reused by every pass over every block."""
        key = id(b)
        hit = self._contexts.get(key)
        if hit is None or hit[0] is not b:  # the batch object itself is kept, so its id cannot be reused
            am = b.attention_mask.to(self.device) if b.attention_mask is not None else None
            hit = self._contexts[key] = (b, self.model.block_context(b.ids.to(self.device), am))
        return hit[1]

    def run_stage(self, blk: nn.Module, k: int, batches: list[CalibBatch], states: list[dict],
                  on_batch=None, advance: bool = False) -> None:
        """Run stage k of the block's forward (models.base.staged_forward) on every batch's state. advance=True
        replaces each state by the stage's output; otherwise the pass only feeds hooks (which may StopBlock)."""
        with torch.no_grad():
            for j, b in enumerate(batches):
                if on_batch:
                    on_batch(j)
                try:
                    s = blk.stage(k, states[j], **self.context(b))
                except StopBlock:
                    if advance:
                        raise RuntimeError("StopBlock raised during a pass whose outputs are needed") from None
                    continue
                if advance:
                    states[j] = s

    @torch.no_grad()
    def run(self, blk: nn.Module, batches: list[CalibBatch], cache: HiddenCache, out: HiddenCache | None = None,
            on_batch=None) -> None:
        """Forward every cached batch through `blk`; store outputs in `out` if given.
        `on_batch(j)` is called before batch j (hooks use it to find the batch's token weights)."""
        for j, b in enumerate(batches):
            if on_batch:
                on_batch(j)
            try:
                h = blk(cache.get(j).to(self.device), **self.context(b))
            except StopBlock:  # a statistics hook has everything it needs from this batch
                if out is not None:
                    raise RuntimeError("StopBlock raised during a pass whose outputs are needed") from None
                continue
            if out is not None:
                out.set(j, h)
