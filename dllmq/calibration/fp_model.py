"""The full-precision model that calibration runs: TMAS's sampler and CGQ's confidences, memory-bounded.

TMAS runs the model's own denoising sampler (one full forward per step) and CGQ needs the model's
confidences; both used to load the whole model in float32 (~32 GB for LLaDA-8B), the one step of
`dllmq quantize` whose memory grew with depth. Here the model runs in bfloat16 (float32 only on CPUs that
emulate bf16, see `forward_dtype`), in one of two modes, chosen by :func:`plan`:

* ``whole``: every block is read from the shards once and kept on the device (the model fits);
* ``stream``: one block at a time is read from the shards (the block loop's `BlockStream`), applied
  to the hidden states of *all* calibration sequences, then freed. Peak memory is one block plus
  the embedding and head plus the activations, independent of depth. The samplers of all
  calibration batches run in lockstep (:func:`run_lockstep`), so one denoising step costs one
  pass over the weights for the whole calibration set, not one per batch. The cost is re-reading
  each block once per step: from the page cache, a memcpy and a dtype copy per block on CPU (small
  next to the block's matmuls over every calibration token), a host-to-device copy on a GPU.

Both modes compute exactly what the whole model's forward computes (same modules, same dtype,
same order of operations): tests compare the logits with `load_model(..., bfloat16)`.

Choice (``auto``): on a GPU, ``whole`` when the model's bfloat16 bytes plus headroom fit in the
device's free memory (torch.cuda.mem_get_info), else ``stream``. On CPU always ``stream``: a whole
copy would make the process's peak resident memory grow with depth, the one thing the block-by-block
pipeline avoids, and buys little there (a CPU forward is dominated by the matmuls, not by copying the
weights out of the page cache). ``DLLMQ_CALIB_FORWARD=whole|stream`` overrides the choice.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import UserError
from ..models.base import DiffusionLM
from ..models.loading import ShardReader, build_empty, parse
from ..runtime.native import native_bf16
from .blocks import BlockStream

MODES = ("auto", "whole", "stream")
ENV = "DLLMQ_CALIB_FORWARD"
DTYPE = torch.bfloat16


def forward_dtype(device: str) -> torch.dtype:
    """bfloat16, except on CPUs that only emulate it (no AVX512-BF16 / AMX), where a bf16 forward took 5.3x the
    float32 one (2-core AVX2 AMD EPYC, the bundled model): there the streamed blocks compute in float32. Peak memory
    stays independent of depth (one block at a time); the embedding and head take 4 B/weight instead of 2."""
    return torch.float32 if torch.device(device).type == "cpu" and not native_bf16("cpu") else DTYPE


def model_bytes(reader: ShardReader, blocks_path: str, dtype: torch.dtype = DTYPE) -> tuple[int, int]:
    """(bytes of the whole model in `dtype`, bytes of its largest block), from the shard headers."""
    per = torch.empty(0, dtype=dtype).element_size()
    total, blocks = 0, {}
    prefix = blocks_path + "."
    for name, shard in reader.map.items():
        n = 1
        for s in reader._handle(shard).get_slice(name).get_shape():
            n *= s
        total += n * per
        if name.startswith(prefix):
            k = name[len(prefix):].split(".")[0]
            blocks[k] = blocks.get(k, 0) + n * per
    reader.close()
    return total, max(blocks.values(), default=0)


@dataclass
class Plan:
    mode: str  # "whole" | "stream"
    device: str
    reason: str
    model_bytes: int
    block_bytes: int
    free_bytes: int | None = None
    dtype: str = "bfloat16"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan(src: Path, device: str, activations_bytes: int = 0, mode: str | None = None) -> Plan:
    """Whole model or streamed blocks for the calibration forwards on `device` (see the module docstring)."""
    mode = mode or os.environ.get(ENV, "auto") or "auto"
    if mode not in MODES:
        raise UserError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    arch, _ = parse(src)
    dtype = forward_dtype(device)
    total, block = model_bytes(ShardReader(src), arch.blocks_path, dtype)
    dev = torch.device(device)
    name = str(dtype).replace("torch.", "")
    if mode != "auto":
        return Plan(mode, device, f"{ENV}={mode}", total, block, dtype=name)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        need = int(total * 1.1) + activations_bytes  # + 10 %: allocator slack
        if need <= free:
            return Plan("whole", device, "fits in the GPU's free memory", total, block, free, dtype=name)
        return Plan("stream", device, "does not fit in the GPU's free memory", total, block, free, dtype=name)
    if dev.type == "cpu":
        why = "on CPU, streaming keeps peak memory independent of depth"
        if dtype != DTYPE:
            why += "; float32: this CPU only emulates bf16"
        return Plan("stream", device, why, total, block, dtype=name)
    return Plan("whole", device, f"{dev.type}: no free-memory query", total, block, dtype=name)


@dataclass
class ForwardStats:
    passes: int = 0
    forwards: int = 0  # batches forwarded (one pass covers every pending batch)
    block_loads: int = 0
    load_seconds: float = 0.0  # reading blocks from the shards onto the device (the cost of streaming)
    forward_seconds: float = 0.0  # everything in the passes, loads included
    max_resident_blocks: int = 0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["load_seconds"] = round(d["load_seconds"], 3)
        d["forward_seconds"] = round(d["forward_seconds"], 3)
        return d


class LayerwiseLM:
    """A full-precision dLLM read from its shards block by block (`whole=False`) or kept whole.

    It offers what the samplers and calibration need from a `DiffusionLM` (arch, config, mask_token_id,
    device, aligned_logits) plus :meth:`iter_logits`, which runs several batches through every block in
    one pass over the weights.
    """

    def __init__(self, src: Path, device: str = "cpu", dtype: torch.dtype = DTYPE, whole: bool = False):
        arch, config = parse(src)
        self.arch, self.config = arch, config
        self.device = torch.device(device)
        self.dtype = dtype
        self.whole = whole
        self.reader = ShardReader(src)
        self.model: DiffusionLM = build_empty(arch, config)
        self.stream = BlockStream(self.model, self.reader, device, dtype)
        self.stats = ForwardStats()
        self.on_block = None  # progress hook: on_block(blocks done, blocks) during every pass over the weights
        self._resident: set[int] = set()
        prefix = arch.blocks_path + "."
        names = [n for n in self.model.state_dict() if not n.startswith(prefix)]
        missing = [n for n in names if n not in self.reader]
        if missing:
            raise UserError(f"checkpoint in {src} lacks {missing[0]} (and {len(missing) - 1} more); is config.json "
                            "from the same model?")
        state = {n: self.reader.get(n).to(device=self.device, dtype=dtype, copy=True) for n in names}
        self.model.load_state_dict(state, strict=False, assign=True)
        self.reader.close()
        self.vocab_rows = self.model.get_parameter(f"{arch.embed_name}.weight").shape[0]

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def parameters(self):  # generate_ids and friends look up the device this way
        yield self.model.get_parameter(f"{self.arch.embed_name}.weight")

    def _block(self, i: int):
        if i in self._resident:
            return self.model.blocks[i]
        t0 = time.perf_counter()
        blk = self.stream.materialize(i)
        self.reader.close()  # pages of the shards read so far stop counting as resident
        self._resident.add(i)
        self.stats.block_loads += 1
        self.stats.max_resident_blocks = max(self.stats.max_resident_blocks, len(self._resident))
        self.stats.load_seconds += time.perf_counter() - t0
        return blk

    def _release(self, i: int) -> None:
        if not self.whole:
            self.stream.release(i)
            self._resident.discard(i)

    def close(self) -> None:
        for i in list(self._resident):
            self.stream.release(i)
        self._resident.clear()
        self.reader.close()

    @torch.no_grad()
    def hidden_many(self, requests: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        """Final hidden states (before the norm and head) of each (ids, attention_mask) request, with every
        block applied to all requests before the next block is read."""
        t0 = time.perf_counter()
        ids = [r[0].to(self.device) for r in requests]
        top = max(int(x.max()) for x in ids) if ids else -1
        if top >= self.vocab_rows:
            raise UserError(f"the tokenizer produced token id {top}, beyond the model's embedding table "
                            f"({self.vocab_rows} rows): the tokenizer does not belong to this model; fix its files")
        ams = [None if r[1] is None else r[1].to(self.device) for r in requests]
        ctxs = [self.model.block_context(x, m) for x, m in zip(ids, ams)]
        hs = [self.model.embed(x) for x in ids]
        for i in range(self.config.num_layers):
            blk = self._block(i)
            hs = [blk(h, **c) for h, c in zip(hs, ctxs)]
            self._release(i)
            if self.on_block is not None:
                self.on_block(i + 1, self.config.num_layers)
        self.stats.passes += 1
        self.stats.forwards += len(requests)
        self.stats.forward_seconds += time.perf_counter() - t0
        return hs

    @torch.no_grad()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Aligned logits (position i predicts token i, as `DiffusionLM.aligned_logits`) from final hidden states."""
        t0 = time.perf_counter()
        logits = self.model.head(h)
        if self.arch.logits_shifted:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        self.stats.forward_seconds += time.perf_counter() - t0
        return logits

    def iter_logits(self, requests) -> Iterator[torch.Tensor]:
        """Aligned logits of each request, in order: one pass over the blocks for all of them, then the head
        one request at a time (only one [B, L, vocab] tensor is made at a time)."""
        hs = self.hidden_many(requests)
        for j in range(len(hs)):
            h, hs[j] = hs[j], None
            yield self.head(h)

    def aligned_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return next(self.iter_logits([(input_ids, attention_mask)]))

    __call__ = aligned_logits


def iter_logits(model, requests) -> Iterator[torch.Tensor]:
    """Aligned logits of each (ids, attention_mask) request, for a `LayerwiseLM` (one pass for all) or a
    plain `DiffusionLM` (one forward each)."""
    if isinstance(model, LayerwiseLM):
        yield from model.iter_logits(requests)
        return
    for ids, am in requests:
        with torch.no_grad():
            yield model.aligned_logits(ids, am)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------
# Lockstep: several samplers, one pass over the weights per step


class _Abort(BaseException):
    pass


class _Job(threading.Thread):
    """Runs `fn(logits_fn)` in a thread that only runs while the coordinator waits for it: `logits_fn`
    hands the request over and sleeps until the coordinator resumes it with the logits."""

    def __init__(self, fn: Callable[[Callable], None]):
        super().__init__(daemon=True)
        self.fn = fn
        self.go = threading.Event()
        self.paused = threading.Event()
        self.request = None
        self.result = None
        self.done = False
        self.error: BaseException | None = None
        self.abort = False

    def logits_fn(self, ids, am=None):
        self.request, self.result = (ids, am), None
        self.paused.set()
        self.go.wait()
        self.go.clear()
        if self.abort:
            raise _Abort
        out, self.result = self.result, None
        return out

    def run(self):
        self.go.wait()
        self.go.clear()
        try:
            if not self.abort:
                self.fn(self.logits_fn)
        except _Abort:
            pass
        except BaseException as e:  # handed to the coordinator, which raises it
            self.error = e
        finally:
            self.done, self.request = True, None
            self.paused.set()

    def resume(self, result=None) -> None:
        """Let the job run until it asks for logits again or ends."""
        self.result = result
        self.paused.clear()
        self.go.set()
        self.paused.wait()
        if self.error is not None:
            raise self.error


def run_lockstep(model, fns: list[Callable[[Callable], None]]) -> None:
    """Run `fns` (each calls `logits_fn(ids, attention_mask)` any number of times) so that each round of
    requests, one from every job still running, is served by one :func:`iter_logits` pass.

    Exactly one thread runs at a time (the jobs take turns, in order), so the jobs see the same results as
    if they ran one after the other, and only one job's logits tensor is alive at a time.
    """
    jobs = [_Job(fn) for fn in fns]
    for j in jobs:
        j.start()
    try:
        for j in jobs:
            j.resume()
        while True:
            live = [j for j in jobs if not j.done]
            if not live:
                break
            for j, logits in zip(live, iter_logits(model, [j.request for j in live])):
                j.resume(logits)
                del logits
    finally:
        for j in jobs:
            if not j.done:
                j.abort = True
                j.go.set()
        for j in jobs:
            if j.done or j.abort:
                j.join(timeout=5)
