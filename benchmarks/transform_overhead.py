"""What DuQuant's online transforms cost in a denoising step at LLaDA-8B block shapes: the same W4A8 checkpoint timed
with its transforms and with them switched off (inputs then reach the int8 GEMMs unrotated: wrong numbers, same
work otherwise), alternating, in one run.

    python benchmarks/transform_overhead.py

Writes benchmarks/results/transform_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import wide_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import dllmq
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import CalibOptions, quantize
    from dllmq.quantization.spec import ActSpec, WeightSpec
    from dllmq.runtime.qlinear import QuantLinear

    with tempfile.TemporaryDirectory() as tmp:
        src = wide_model(tmp, tokenizer=True)
        t0 = time.time()
        qcfg = QuantizationConfig("duquant", WeightSpec(4, False, "channel", None), ActSpec(8),
                                  ignore=[r"model\.transformer\.ff_out"])
        quantize(src, qcfg, Path(tmp) / "q", calib=CalibOptions(mask="none", samples=8),
                 show_progress=False)
        quant_s = time.time() - t0
        model = dllmq.load(Path(tmp) / "q")  # the runtime default dtype: bf16 where native, else float32
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        saved = [m.input_transform for m in layers]
        x = torch.randint(0, 4000, (1, args.seq_len))

        def step(on: bool) -> float:
            for m, t in zip(layers, saved):
                m.input_transform = t if on else None
            t1 = time.perf_counter()
            with torch.no_grad():
                model(x)
            return (time.perf_counter() - t1) * 1e3

        step(True), step(False)  # warm-up: prepared kernel states
        on, off = [], []
        for _ in range(args.repeats):  # alternating, so drifts of the machine's load hit both alike
            on.append(step(True))
            off.append(step(False))
    res = {"seq_len": args.seq_len, "repeats": args.repeats, "transforms": sum(t is not None for t in saved),
           "quantized_layers": len(layers), "step_ms_with": statistics.median(on),
           "step_ms_without": statistics.median(off), "quantize_seconds": quant_s, "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    res["overhead"] = res["step_ms_with"] / res["step_ms_without"] - 1
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transform_overhead.json").write_text(json.dumps(res, indent=2))
    md = (f"# DuQuant W4A8 online transforms at LLaDA-8B block shapes\n\n`python benchmarks/transform_overhead.py` "
          f"(2 random blocks, d 4096, MLP 12288; {args.seq_len}-token step, median of {args.repeats} alternating runs, "
          f"{res['threads']} threads)\n\n| | step (ms) |\n|---|---|\n| with the transforms | {res['step_ms_with']:.1f} |\n"
          f"| transforms switched off | {res['step_ms_without']:.1f} |\n| overhead | {100 * res['overhead']:.1f} % |\n\n"
          f"{res['transforms']} of {res['quantized_layers']} quantized layers carry a transform object (q/k/v and "
          f"gate/up share one each, computed once per input).\n")
    (RESULTS / "transform_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
