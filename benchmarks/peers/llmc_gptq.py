"""Run inside the llm-compressor venv (benchmarks/compare_gptq.py creates it): GPTQ W4A16 via `oneshot`.

Reads the FP model folder and the calibration ids (a safetensors file with `calib` [n, L]), runs
GPTQModifier with the requested spec, and prints one JSON line:
  {"quant_seconds": oneshot() wall time, "save_seconds": save_pretrained(save_compressed=True) wall time, ...}
Timed: only the oneshot() call (it includes llm-compressor's dataset wrapping, model tracing for the
sequential pipeline, calibration forwards and GPTQ). Not timed: imports, model loading, saving, export.

With --dense-out it then reloads the compressed checkpoint with transformers (compressed-tensors
decompresses it, `dequantize=True`, to plain fp32 Linear weights) and writes those weights as an ordinary LLaMA
safetensors checkpoint, so the main venv can evaluate it without compressed-tensors installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="safetensors file holding `calib` int64 [n, L]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dense-out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="-1: one scale per output channel")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    ids = load_file(a.calib)["calib"]
    n, L = ids.shape
    tok = PreTrainedTokenizerFast.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * L] * n})
    if a.group_size == -1:
        wargs = QuantizationArgs(num_bits=a.bits, type="int", symmetric=True, strategy="channel")
    else:
        wargs = QuantizationArgs(num_bits=a.bits, type="int", symmetric=True, strategy="group",
                                 group_size=a.group_size)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=wargs)},
                          ignore=["lm_head"], block_size=128, dampening_frac=a.damp,
                          actorder=None)  # act_order off (llm-compressor's default is "static")

    t0, c0 = time.perf_counter(), time.process_time()
    model = oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, num_calibration_samples=n,
                    max_seq_length=L, batch_size=a.batch_size, pipeline="sequential",
                    shuffle_calibration_samples=False)
    quant_s, quant_cpu = time.perf_counter() - t0, time.process_time() - c0
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    save_s = time.perf_counter() - t0
    res = {"tool": "llm-compressor", "quant_seconds": quant_s, "quant_cpu_seconds": quant_cpu, "save_seconds": save_s, "threads": a.threads,
           "versions": {}}
    import compressed_tensors
    import llmcompressor
    import transformers

    res["versions"] = {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                       "transformers": transformers.__version__, "torch": torch.__version__}
    res["format"] = json.loads((out / "config.json").read_text()).get("quantization_config", {}).get("format")

    if a.dense_out:
        del model
        fp_keys = set(load_file(str(Path(a.model) / "model.safetensors")))
        from transformers.utils.quantization_config import CompressedTensorsConfig

        q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
        sd = {k: v.detach().contiguous().clone() for k, v in q.state_dict().items() if k in fp_keys}
        missing = sorted(fp_keys - set(sd))
        if missing:
            raise SystemExit(f"decompressed model lacks {missing[:3]}")
        dense = Path(a.dense_out)
        if dense.exists():
            shutil.rmtree(dense)
        dense.mkdir(parents=True)
        save_file(sd, str(dense / "model.safetensors"), metadata={"format": "pt"})
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if (Path(a.model) / f).exists():
                shutil.copy(Path(a.model) / f, dense / f)
        res["dense_out"] = str(dense)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
