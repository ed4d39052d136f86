"""The headline checkpoint at LLaDA-8B block shapes: DuQuant W4A8 (paper defaults) on a 2-block random LLaDA
with LLaDA-8B's block shapes (d 4096, 32 heads, MLP 12288; 4096-token vocabulary so the blocks dominate).

Measures, in one run: quantization time of DuQuant W4A8 and of GPTQ W4 (both `dllmq quantize`, clean
calibration, 8 samples), checkpoint bytes against the bf16 model's, and `dllmq bench` (denoising step and
generation against bf16, same run, alternating). Writes benchmarks/results/duquant_8b_block.{json,md}.

    python benchmarks/duquant_8b_block.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kernels import wide_model  # noqa: E402

DLLMQ = str(Path(sys.executable).parent / "dllmq")
RESULTS = Path(__file__).parent / "results"


def cli(*args: str) -> dict:
    p = subprocess.run([DLLMQ, *args, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"dllmq {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--headline", action="store_true",
                    help="also time the headline command with every default (TMAS calibration, default samples) and "
                         "extrapolate it to LLaDA-8B's 32 blocks")
    ap.add_argument("--out", type=Path, default=RESULTS / "duquant_8b_block",
                    help="results path without suffix (.json and .md are written)")
    args = ap.parse_args()
    from dllmq.runtime import native

    out: dict = {"cpu": native.cpu_description()}
    with tempfile.TemporaryDirectory() as tmp:
        src = wide_model(tmp, tokenizer=True)
        params = 0
        from safetensors import safe_open

        for f in src.glob("*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                params += sum(sf.get_slice(n).get_shape()[0] * (sf.get_slice(n).get_shape() + [1])[1] for n in sf.keys())
        out["bf16_bytes"] = 2 * params
        for label, extra in (("duquant_w4a8", ["--method", "duquant", "--w", "4", "--a", "8"]),
                             ("gptq_w4", ["--method", "gptq", "--w", "4"])):
            t0 = time.time()
            q = cli("quantize", str(src), *extra, "--calib-mask", "none", "--calib-samples", str(args.samples),
                    "--out", f"{tmp}/{label}")
            out[label] = {"quantize_seconds": time.time() - t0, "bytes": q["bytes"], "peak_rss_bytes": q["peak_rss_bytes"]}
            print(label, out[label], flush=True)
        if args.headline:
            t0 = time.time()
            q = cli("quantize", str(src), "--method", "duquant", "--w", "4", "--a", "8", "--out", f"{tmp}/headline")
            fwd = (q.get("calibration") or {}).get("fp_forward") or {}
            total = time.time() - t0
            calib_s = float(fwd.get("seconds") or 0.0)
            # the calibration sampler and the block loop both scale with depth; the LM head (126k rows in LLaDA-8B,
            # 4k here) adds about 2.4 blocks' worth of weights to every sampler step, which this model lacks
            out["headline"] = {"seconds": total, "calibration_seconds": calib_s, "calibration": q.get("calibration"),
                               "blocks": 2, "extrapolated_32_blocks_seconds": (total - calib_s) * 16 + calib_s * (32 + 2.4) / (2 + 0.08)}
            print("headline", out["headline"], flush=True)
        b = cli("bench", f"{tmp}/duquant_w4a8", "--against", str(src), "--repeats", str(args.repeats),
                "--gen-length", "32", "--steps", "8", "--block-length", "32", "--no-memory")
        out["bench"] = b
        print(json.dumps(b, indent=1)[:3000], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out["date"] = time.strftime("%Y-%m-%d")
    prev_file = args.out.with_suffix(".json")
    if "headline" not in out and prev_file.exists():
        # a run without --headline keeps the last headline timing (an hour of CPU), labelled with its own date
        prev = json.loads(prev_file.read_text())
        if "headline" in prev:
            out["headline"] = {**prev["headline"], "date": prev["headline"].get("date", prev.get("date", "earlier run"))}
    elif "headline" in out:
        out["headline"]["date"] = out["date"]
    prev_file.write_text(json.dumps(out, indent=2, default=str))
    d = out["duquant_w4a8"]
    md = ["# DuQuant W4A8 at LLaDA-8B block shapes (2 blocks)", "",
          f"`python benchmarks/duquant_8b_block.py{' --headline' if args.headline else ''}` ({out['cpu']}, one run).", "",
          f"- checkpoint: {d['bytes'] / 2**20:.0f} MiB vs {out['bf16_bytes'] / 2**20:.0f} MiB bf16 "
          f"({d['bytes'] / out['bf16_bytes']:.2f}x)",
          f"- quantize: DuQuant W4A8 {d['quantize_seconds']:.0f} s, GPTQ W4 {out['gptq_w4']['quantize_seconds']:.0f} s "
          f"({d['quantize_seconds'] / out['gptq_w4']['quantize_seconds']:.2f}x)", "",
          *([f"- headline command with every default (`dllmq quantize MODEL --method duquant --w 4 --a 8`, TMAS "
             f"calibration): {out['headline']['seconds']:.0f} s for 2 blocks, {out['headline']['calibration_seconds']:.0f} s "
             f"of it the calibration sampler; extrapolated to LLaDA-8B's 32 blocks (+ its LM head in every sampler "
             f"step): {out['headline']['extrapolated_32_blocks_seconds'] / 60:.0f} min on this CPU "
             f"(measured {out['headline']['date']})"]
            if "headline" in out else []), "",
          "`dllmq bench` (quantized vs full precision in the runtime's default dtype, same run):", "", "```", json.dumps(out["bench"], indent=1, default=str)[:4000], "```"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:6]))


if __name__ == "__main__":
    main()
