"""The bundled model's training script (examples/train_tiny_dllm.py): a few steps on CPU, so that a
GPU session spends its minutes on training, not on debugging."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dllmq.models.loading import BUNDLED_DIR, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_tiny_dllm", ROOT / "examples" / "train_tiny_dllm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_batches_are_full_whatever_the_token_budget():
    """A pool smaller than a batch left a high-variance leftover batch after every full one: at 64k tokens
    per batch the H200 run plateaued at loss ~2.5 and went NaN. Every batch now holds at least half the budget."""
    mod = _script()
    tok = load_tokenizer(BUNDLED_DIR / "tiny-llada")
    for budget in (4096, 32768):
        it = mod.batches(tok, 0, 256, budget)
        sizes = [ids.numel() for ids, _ in (next(it) for _ in range(12))]
        assert min(sizes) >= budget // 2, (budget, sizes)
        assert max(sizes) <= budget


def test_worker_shards_are_independent_streams_over_one_world():
    from dllmq.data import synthetic

    a = [next(synthetic.training_stream(0, shard=1)) for _ in range(1)]
    b = [next(synthetic.training_stream(0, shard=2)) for _ in range(1)]
    s0, s0b = synthetic.training_stream(0), synthetic.training_stream(0, shard=0)
    assert [next(s0) for _ in range(5)] == [next(s0b) for _ in range(5)]  # shard 0 is the historical stream
    assert a != b


@pytest.mark.timeout(300)
def test_a_few_steps_with_workers_and_time_budget(tmp_path):
    mod = _script()
    out = tmp_path / "tiny"
    mod.main(["--out", str(out), "--tokenizer", str(BUNDLED_DIR / "tiny-llada"), "--d-model", "64", "--n-layers", "2",
              "--n-heads", "2", "--mlp-hidden", "128", "--steps", "12", "--time-budget", "600", "--workers", "1",
              "--token-budget", "2048", "--eval-math", "2", "--threads", "1", "--device", "auto"])
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 12 and info["workers"] == 1 and info["arch"]["d_model"] == 64
    assert math.isfinite(info["final_loss_ema"]) and info["final_loss_ema"] > 0
    assert info["tiny_math_first_n"]["n"] == 2
    state = load_file(str(out / "model.safetensors"))
    assert all(v.isfinite().all() for v in state.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["d_model"] == 64 and "auto_map" not in cfg
    assert load_tokenizer(out).get_vocab() == load_tokenizer(BUNDLED_DIR / "tiny-llada").get_vocab()
    log = (out / "training_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,tokens,seconds,lr" and len(log) >= 2


def test_fine_tune_from_a_model_with_a_mix_and_column_math(tmp_path):
    """--init keeps the starting model's shape and tokenizer and starts from its weights; --mix and
    --math-format reach the data stream."""
    import torch

    mod = _script()
    base = tmp_path / "base"
    mod.main(["--out", str(base), "--tokenizer", str(BUNDLED_DIR / "tiny-llada"), "--d-model", "64", "--n-layers", "2",
              "--n-heads", "2", "--mlp-hidden", "128", "--steps", "2", "--token-budget", "1024", "--threads", "1"])
    out = tmp_path / "ft"
    mod.main(["--out", str(out), "--init", str(base), "--steps", "3", "--token-budget", "1024", "--threads", "1",
              "--lr", "1e-9", "--warmup", "1", "--mix", "math_chat=3,arith_text=1", "--math-format", "columns"])
    info = json.loads((out / "training.json").read_text())
    assert info["arch"]["d_model"] == 64 and info["init"] == str(base) and info["math_format"] == "columns"
    a, b = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    # a learning rate of 1e-9 barely moves the weights: the fine-tune started from the base model's
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-2) for k in a)
    it = mod.batches(load_tokenizer(out), 0, 256, 4096, mixture=mod.parse_mix("math_chat=1"), math_format="columns")
    ids, _ = next(it)
    texts = [load_tokenizer(out).decode(row) for row in ids]
    assert all("####" in t for t in texts) and sum(">" in t for t in texts) > len(texts) // 2
    with pytest.raises(SystemExit, match="--mix"):
        mod.parse_mix("nonsense=1")


def test_gpu_session_training_flags_parse():
    """The prepared GPU session (benchmarks/gpu_session.sh) runs once, on borrowed minutes: its --mix must name known
    sources and its flags must be the training script's."""
    import re
    import shlex

    mod = _script()
    sh = (BUNDLED_DIR.parents[1] / "benchmarks" / "gpu_session.sh").read_text()
    cmd = re.search(r"python3 examples/train_tiny_dllm\.py(.*?)>", sh, re.S).group(1).replace("\\\n", " ")
    args = shlex.split(cmd)
    mix = args[args.index("--mix") + 1]
    assert set(mod.parse_mix(mix)) >= {"math_chat", "arith_chat"}
    known = {a.option_strings[0] for a in mod.build_parser()._actions if a.option_strings}
    assert {a for a in args if a.startswith("--")} <= known
