"""DuQuant: which dtype to store the rotations in, chosen by measured output error.

For each storage dtype the bundled model is quantized with DuQuant (weights folded against the stored,
rounded rotations), loaded as a user would (bf16 compute, and fp32 for reference), and its logits are
compared with the full-precision model's on held-out text. Also reports the bytes of the transforms in
the checkpoint and, analytically, at LLaDA-8B shapes. Writes benchmarks/results/duquant_storage.{md,json}.

    python benchmarks/duquant_storage.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import dllmq
from dllmq.checkpoint.format import QuantizationConfig
from dllmq.pipeline import CalibOptions, quantize
from dllmq.quantization.spec import ActSpec, WeightSpec

RESULTS = Path(__file__).parent / "results"


def transform_bytes_8b(itemsize: int) -> int:
    """LLaDA-8B: per block one transform for q/k/v, attn_out, gate/up (width 4096) and ff_out (12288),
    each two [K/128, 128, 128] rotations, a [K] smoothing vector and an int64 [K] permutation."""
    per_block = sum(2 * k * 128 * itemsize + k * itemsize + k * 8 for k in (4096, 4096, 4096, 12288))
    return 32 * per_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--w", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()
    from dllmq.evaluation.report import default_eval_texts
    from dllmq.models.loading import load_tokenizer, resolve_model_path

    src = resolve_model_path("tiny")
    tok = load_tokenizer(src)
    from dllmq.evaluation.quality import chunk_texts

    seqs = chunk_texts(tok, default_eval_texts(), 128, 8)
    refs = {dt: dllmq.load("tiny", dtype=dt) for dt in (torch.bfloat16, torch.float32)}
    with torch.no_grad():
        ref_logits = {dt: m(seqs).float() for dt, m in refs.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.w:
            for store in ("float32", "bfloat16", "float16"):
                qcfg = QuantizationConfig("duquant", WeightSpec(w, False, "channel", None),
                                          ActSpec(8, symmetric=False, clip_ratio=0.9),
                                          ignore=[r"model\.transformer\.ff_out"])
                out = Path(tmp) / f"w{w}-{store}"
                quantize("tiny", qcfg, out, calib=CalibOptions(mask="none", samples=args.samples),
                         method_options={"store_dtype": store, "w_clip": 0.8}, show_progress=False)
                row = {"weights": f"W{w}A8", "store": store}
                for dt, ref in ref_logits.items():
                    m = dllmq.load(out, dtype=dt)
                    with torch.no_grad():
                        q = m(seqs).float()
                    row[f"rel_err_{str(dt).split('.')[1]}"] = float((q - ref).norm() / ref.norm())
                from safetensors import safe_open

                nbytes = 0
                for f in out.glob("*.safetensors"):
                    with safe_open(str(f), "pt") as sf:
                        nbytes += sum(sf.get_tensor(n).nbytes for n in sf.keys() if ".input_transform." in n)
                row["transform_bytes"] = nbytes
                row["llada8b_transform_GiB"] = transform_bytes_8b(torch.empty(0, dtype=getattr(torch, store)).element_size()) / 2**30
                rows.append(row)
                print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "duquant_storage.json").write_text(json.dumps(rows, indent=2))
    lines = ["| weights | rotation storage | rel. logit error (bf16 compute) | (fp32 compute) | transform bytes (bundled) | LLaDA-8B transforms (GiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['store']} | {r['rel_err_bfloat16']:.5f} | {r['rel_err_float32']:.5f} | "
                     f"{r['transform_bytes']:,} | {r['llada8b_transform_GiB']:.3f} |")
    (RESULTS / "duquant_storage.md").write_text(
        "# DuQuant rotation storage dtype\n\n`python benchmarks/duquant_storage.py` (bundled model, per-channel "
        "asymmetric weights with clip 0.8, asymmetric per-token activations with clip 0.9, clean calibration).\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
