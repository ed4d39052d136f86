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
    assert sum(f.stat().st_size for f in p.glob("*.safetensors")) < 40 * 2**20  # 17.3M parameters in bf16: 33 MiB
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


def test_trained_model_learned_the_formats(tiny):
    """The trained model writes GSM8K-style answers and has a held-out NLL far below uniform."""
    import math

    from dllmq.evaluation.quality import chunk_texts, text_nll
    from dllmq.evaluation.report import default_eval_texts

    m, tok = tiny
    res = run_task("tiny-math", m, tok, GenerationConfig(steps=64, gen_length=64, block_length=32), limit=8)
    assert res.n == 8
    assert sum(extract_answer(s["output"]) is not None for s in res.samples) >= 6, res.samples[:2]
    nll = text_nll(m, chunk_texts(tok, default_eval_texts(), 64, 4), mc_num=2)
    assert nll < 0.8 * math.log(len(tok)), nll  # random weights give about log(V) or more
    mc = run_task("tiny-mc", m, tok, GenerationConfig(), limit=8, mc_num=4)
    assert mc.n == 8 and all(len(s["loglik"]) == 4 for s in mc.samples)


def test_code_task_needs_opt_in(tiny):
    from dllmq.errors import UserError

    m, tok = tiny
    with pytest.raises(UserError, match="allow-code-execution"):
        run_task("tiny-code", m, tok, GenerationConfig(), limit=1)
    res = run_task("tiny-code", m, tok, GenerationConfig(), limit=4, allow_exec=True)
    assert res.n == 4 and all("output" in s and s["pass@1"] in (0.0, 1.0) for s in res.samples)
