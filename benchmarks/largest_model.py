"""The largest model this machine quantizes from disk: a LLaDA-8B-shaped checkpoint, block by block.

    python benchmarks/largest_model.py                       # LLaDA-8B shape, RTN W4 g128
    python benchmarks/largest_model.py --method gptq --layers 4   # GPTQ on the first 4 blocks' shape

1. Streams a random bf16 checkpoint with LLaDA-8B-Instruct's exact config fields and tensor names
   (d_model 4096, 32 blocks, MLP 12288, vocab 126464: 8.0B parameters, ~16 GB) to --workdir, one
   shard per block group, never holding more than one shard in memory.
2. Quantizes it with `dllmq quantize` in a fresh process and reports that process's peak RSS, its
   wall time and the sizes on disk. The point is memory: the pipeline holds one block (plus the
   non-block tensors it is writing) at a time, so peak RSS stays far below the model size.

Random weights say nothing about quality; use the bundled model for that.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dllmq.models.llada import LLADA  # noqa: E402
from dllmq.models.tiny import LLADA_CHAT_TEMPLATE, LLADA_SPECIAL, byte_tokenizer, llada_config  # noqa: E402

LLADA_8B = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, rope_theta=500000.0)


def write_model(out: Path, layers: int, seed: int = 0) -> tuple[int, int]:
    """-> (parameters, bytes). Shards of 4 blocks; non-block tensors in their own shard."""
    out.mkdir(parents=True, exist_ok=True)
    raw = llada_config(**{**LLADA_8B, "n_layers": layers})
    raw.pop("auto_map")
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    with torch.device("meta"):
        model = LLADA.build(LLADA.parse_config(raw))
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    blocks = LLADA.blocks_path + "."
    groups: dict[str, list[str]] = {}
    for n in shapes:
        key = f"b{int(n[len(blocks):].split('.')[0]) // 4:03d}" if n.startswith(blocks) else "nonblock"
        groups.setdefault(key, []).append(n)
    g = torch.Generator().manual_seed(seed)
    weight_map, total, params = {}, 0, 0
    for i, (key, names) in enumerate(sorted(groups.items())):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for n in names:
            t = torch.empty(shapes[n], dtype=torch.bfloat16)
            if n.endswith("norm.weight") or "ln_f" in n:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
            shard[n] = t
            weight_map[n] = fname
            total += t.numel() * 2
            params += t.numel()
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        del shard
        print(f"  wrote {fname} ({key})", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    byte_tokenizer(LLADA_SPECIAL, LLADA_CHAT_TEMPLATE, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>",
                   "<|mdm_mask|>", out)
    return params, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="blocks (32 = LLaDA-8B)")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dllmq-largest"))
    ap.add_argument("--keep", action="store_true", help="keep the written model and checkpoint")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "largest_model.json")
    args = ap.parse_args()
    src, dst = args.workdir / "model", args.workdir / "quantized"
    t0 = time.time()
    if not (src / "model.safetensors.index.json").exists():
        params, size = write_model(src, args.layers)
    else:
        idx = json.loads((src / "model.safetensors.index.json").read_text())
        size, params = idx["metadata"]["total_size"], idx["metadata"]["total_size"] // 2
    print(f"model: {params / 1e9:.2f}B parameters, {size / 2**30:.1f} GiB on disk ({time.time() - t0:.0f} s to write)")
    cmd = [str(Path(sys.executable).parent / "dllmq"), "quantize", str(src), "--method", args.method, "--w", "4",
           "--group-size", "128", "--out", str(dst), "--overwrite", "--json"]
    if args.method != "rtn":
        cmd += ["--calib-samples", "4", "--calib-seq-len", "64", "--calib-mask", "random"]
    t1 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t1
    if p.returncode != 0:
        sys.exit(f"quantize failed ({p.returncode}):\n{p.stderr[-3000:]}")
    peak = json.loads(p.stdout)["peak_rss_bytes"] / 2**20  # MiB, the quantize process's own peak
    qsize = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    row = {"layers": args.layers, "parameters": params, "model_gib": size / 2**30, "method": args.method,
           "quantized_gib": qsize / 2**30, "peak_rss_gib": peak / 1024, "quantize_seconds": wall,
           "machine_ram_gib": 24, "command": " ".join(cmd)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))
    print(f"| model | params | bf16 on disk | W4 g128 on disk | peak RSS | time |\n|---|---|---|---|---|---|\n"
          f"| LLaDA-8B shape, {args.layers} blocks | {params / 1e9:.2f}B | {size / 2**30:.1f} GiB | "
          f"{qsize / 2**30:.1f} GiB | {peak / 1024:.2f} GiB | {wall:.0f} s |")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
