"""The bundled trained model and the offline task suite."""

import json

import pytest
import torch

from dllmq.diffusion.generation import GenerationConfig
from dllmq.evaluation.tasks import extract_answer, load_task, mean_stderr, run_task
from dllmq.models.loading import load_model, load_tokenizer, resolve_model_path


@pytest.fixture(scope="module")
def tiny():
    m = load_model("tiny", dtype=torch.float32)
    return m, load_tokenizer(m.source_path)


def test_bundled_is_default_and_small():
    p = resolve_model_path(None)
    assert p == resolve_model_path("tiny")
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["model_type"] == "llada" and "auto_map" not in cfg
    assert sum(f.stat().st_size for f in p.glob("*.safetensors")) < 25 * 2**20
    assert (p / "README.md").exists() and (p / "training_log.csv").exists()


def test_bundled_tokenizer_has_llada_chat_path(tiny):
    m, tok = tiny
    s = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                add_generation_prompt=True)
    assert s.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n")
    assert tok.mask_token_id == m.mask_token_id


def test_task_files_are_held_out_and_well_formed():
    math = load_task("tiny-math")
    code = load_task("tiny-code")
    mc = load_task("tiny-mc")
    assert len(math) == 150 and len(code) == 80 and len(mc) == 200
    assert all(extract_answer(r["solution"]) == r["answer"] for r in math)
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in mc)


def test_scoring_helpers():
    assert extract_answer("3 + 4 = 7\n#### 7") == 7
    assert extract_answer("#### 1,234") == 1234
    assert extract_answer("no answer") is None
    m, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75 and se == pytest.approx(0.25)


def test_trained_model_solves_some_math_and_mc(tiny):
    m, tok = tiny
    gcfg = GenerationConfig(steps=64, gen_length=64, block_length=32)
    math = run_task("tiny-math", m, tok, gcfg, limit=16)
    mc = run_task("tiny-mc", m, tok, gcfg, limit=40, mc_num=8)
    assert math.n == 16 and mc.n == 40
    assert math.value >= MATH_FLOOR, math.samples[:3]
    assert mc.value >= MC_FLOOR


def test_code_task_needs_opt_in(tiny):
    from dllmq.errors import UserError

    m, tok = tiny
    with pytest.raises(UserError, match="allow-code-execution"):
        run_task("tiny-code", m, tok, GenerationConfig(), limit=1)
    res = run_task("tiny-code", m, tok, GenerationConfig(), limit=4, allow_exec=True)
    assert res.n == 4 and all("reason" in s for s in res.samples)


MATH_FLOOR = 0.25  # set from the measured full-precision score (see README), far enough below it to be stable
MC_FLOOR = 0.5


def test_sandboxed_execution():
    from dllmq.evaluation.execution import check_function, run_program

    ok, _ = check_function("def f(x):\n    return x + 1\n", "def check(c):\n    assert c(1) == 2\n", "f")
    bad, why = check_function("def f(x):\n    return x\n", "def check(c):\n    assert c(1) == 2\n", "f")
    slow, why_slow = run_program("while True:\n    pass\n", timeout=1.0)
    assert ok and not bad and "AssertionError" in why
    assert not slow and why_slow == "timeout"
