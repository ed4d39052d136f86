"""Run inside the GPTQModel venv (benchmarks/compare_gptq.py creates it; needs GPTQMODEL_CPU_WORKERS=2 on a
2-core machine): GPTQ via GPTQModel.load + model.quantize.

Prints one JSON line: {"quant_seconds": model.quantize() wall time, "save_seconds": model.save() wall time, ...}.
Timed: only quantize() (GPTQModel's calibration forwards, GPTQ and packing into its GPTQ format). Not timed:
imports, loading, saving, export. Settings: desc_act off and act_group_aware off (GPTQModel enables its
group-aware reordering by default, a form of activation ordering), true_sequential on, damp as given,
static_groups left at GPTQModel's default (off: a group's scale is computed when GPTQ reaches it).

With --dense-out it reloads the saved checkpoint with the TORCH backend, dequantizes every TorchLinear with
its own `dequantize_weight()` and writes the fp32 weights as an ordinary LLaMA safetensors checkpoint.
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
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from safetensors.torch import load_file, save_file

    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    ids = load_file(a.calib)["calib"]
    n, L = ids.shape
    calib = [{"input_ids": ids[i].tolist(), "attention_mask": [1] * L} for i in range(n)]
    qcfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, desc_act=False, act_group_aware=False, sym=True,
                          true_sequential=True, damp_percent=a.damp)
    model = GPTQModel.load(a.model, qcfg, device="cpu", dtype=torch.float32)
    model_dtype = str(next(model.model.parameters()).dtype)
    t0, c0 = time.perf_counter(), time.process_time()
    model.quantize(calib, batch_size=a.batch_size)
    quant_s, quant_cpu = time.perf_counter() - t0, time.process_time() - c0
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    model.save(str(out))
    save_s = time.perf_counter() - t0
    import gptqmodel

    res = {"tool": "GPTQModel", "quant_seconds": quant_s, "quant_cpu_seconds": quant_cpu, "save_seconds": save_s, "threads": a.threads,
           "model_dtype": model_dtype, "versions": {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__}}

    if a.dense_out:
        del model
        fp = load_file(str(Path(a.model) / "model.safetensors"))
        q = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH)
        sd = {}
        for name, mod in q.model.named_modules():
            if hasattr(mod, "dequantize_weight") and f"{name}.weight" in fp:
                w = mod.dequantize_weight().T.detach().float().contiguous()
                if w.shape != fp[f"{name}.weight"].shape:
                    raise SystemExit(f"{name}: dequantized shape {tuple(w.shape)} != {tuple(fp[name + '.weight'].shape)}")
                sd[f"{name}.weight"] = w
        saved = {}  # non-quantized tensors exactly as saved (the reloaded model may hold them in fp16)
        for f in out.glob("*.safetensors"):
            saved.update(load_file(str(f)))
        for k in fp:
            if k not in sd:
                sd[k] = saved[k].float().contiguous()
        res["changed_tensors"] = sum(1 for k in sd if not torch.equal(sd[k], fp[k]))  # 28 linears expected
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
