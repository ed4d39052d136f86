"""Resident memory after every block of `dllmq quantize --method gptq` (TMAS default), in one process: shows whether
anything held from block to block grows with depth, or only the allocator's heap.

    python benchmarks/rss_per_block.py --layers 24
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/rss_per_block.py --layers 24   # glibc: no heap reuse

Prints anonymous and file-backed RSS (Linux /proc/self/status) after each block's shard is written.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def rss_mib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(val.split()[0]) // 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=3072)
    args = ap.parse_args()

    import dllmq.checkpoint.writer as writer
    import dllmq.pipeline as pl
    from dllmq.calibration.states import TMASConfig
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.models.tiny import write_tiny_llada
    from dllmq.quantization.spec import WeightSpec

    original = writer.CheckpointWriter.write_shard

    def traced(self, name, tensors):
        original(self, name, tensors)
        print(f"{name:12s} {rss_mib()}", flush=True)

    writer.CheckpointWriter.write_shard = traced
    with tempfile.TemporaryDirectory() as d:
        src = write_tiny_llada(Path(d) / "m", n_layers=args.layers, d_model=args.d_model, n_heads=args.d_model // 64,
                               n_kv_heads=args.d_model // 64, mlp_hidden_size=args.mlp, small_vocab=512,
                               shards=max(1, args.layers // 4))
        print(f"model written {rss_mib()} (VmHWM includes building the random model)", flush=True)
        t0 = time.time()
        q = QuantizationConfig("gptq", WeightSpec(4, True, "group", 128), ignore=[r"model\.transformer\.ff_out"])
        pl.quantize(str(src), q, Path(d) / "q", show_progress=False,
                    calib=pl.CalibOptions(samples=8, seq_len=64, tmas=TMASConfig(gen_length=16, block_length=8, steps=8)))
        print(f"done in {time.time() - t0:.1f} s {rss_mib()}")


if __name__ == "__main__":
    main()
