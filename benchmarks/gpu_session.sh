#!/usr/bin/env bash
# One prepared GPU session (device tool, one H200, ~15 device-minutes in all). The 2026-11-30 run was this with
# --n-heads 6, plain math solutions and 215 s of training (the bundled model); 8 heads let QuaRot rotate across heads,
# and math solutions in digit columns are what a small masked-diffusion model learns (benchmarks/arith_format_probe.py:
# 71.5 % vs 1.2 % of held-out equations at equal CPU time, trained as prompt -> worked equation: the mix's arith_chat);
# the task preset then needs tiny-math's gen_length 128:
#   bash benchmarks/gpu_session.sh TRAIN_SECONDS CHECK_SECONDS
# 1. trains the bundled-model candidate (examples/train_tiny_dllm.py, 13 data workers, bf16) for TRAIN_SECONDS and
#    scores greedy tiny-math on the 150 held-out problems; the model comes back as 3 safetensors shards (<16 MiB
#    each, the device tool's file limit) plus training.json / training_log.csv / train.log;
# 2. runs benchmarks/gpu_check.py with CHECK_SECONDS of budget (0 skips it).
# Everything lands in $OUT (the device tool's return folder; default ./gpu-out). Reassemble the model here with
#   python benchmarks/gpu_session.py assemble OUTDIR MODELDIR
set -u
OUT=${OUT:-./gpu-out}; mkdir -p "$OUT"
TRAIN=${1:-420}; CHECK=${2:-0}
export PYTHONPATH=. PYTHONUNBUFFERED=1
if [ "$TRAIN" != 0 ]; then
  python3 examples/train_tiny_dllm.py --device cuda --workers 13 --time-budget "$TRAIN" --steps 1000000 \
    --token-budget 65536 --lr 1.5e-3 --warmup 200 --d-model 384 --n-layers 8 --n-heads 8 --mlp-hidden 1024 \
    --tokenizer dllmq/bundled/tiny-llada --out /tmp/tiny --save-every 1000000 --save-every-s 60 --eval-math 150 \
    --math-format columns --eval-gen-length 128 \
    --mix math_chat=0.30,arith_chat=0.10,arith_text=0.05,code_chat=0.22,code_text=0.05,knowledge_chat=0.08,knowledge_text=0.12,stdlib_text=0.08 \
    > "$OUT/train.log" 2>&1
  tail -n 5 "$OUT/train.log"
  python3 benchmarks/gpu_session.py split /tmp/tiny "$OUT"
fi
if [ "$CHECK" != 0 ]; then
  timeout $((CHECK + 15)) python3 benchmarks/gpu_check.py --out /tmp/gc --budget-s "$CHECK" 2>&1 | tail -n 15
  cp /tmp/gc/gpu_check.json /tmp/gc/gpu_check.md "$OUT/" 2>/dev/null
fi
ls -la "$OUT"
