"""lm-evaluation-harness integration: the registered LM class, presets, tiny tasks, local-data tasks, --compare."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from cli_helpers import run_cli  # noqa: E402

from dllmq.diffusion.likelihood import mc_loglikelihood  # noqa: E402
from dllmq.errors import UserError  # noqa: E402
from dllmq.evaluation.engine import DiffusionEvaluator, EngineConfig  # noqa: E402
from dllmq.evaluation.harness import DLLMQLM, resolve_settings, run_harness_task  # noqa: E402
from dllmq.evaluation.report import degradation_level  # noqa: E402
from dllmq.evaluation.tasks import load_task, run_task  # noqa: E402
from dllmq.models.loading import load_model, load_tokenizer, resolve_model_path  # noqa: E402


@pytest.fixture(scope="module")
def bundled():
    p = resolve_model_path("tiny")
    return load_model(p, dtype=torch.float32), load_tokenizer(p)


class OracleEngine(DiffusionEvaluator):
    """Answers every generation request from a lookup table: checks the scoring path, not the model."""

    def __init__(self, model, tok, answers):
        super().__init__(model, tok, EngineConfig())
        self.answers = answers
        self.contexts = []

    def generate(self, contexts, until=None, gcfg=None, on_batch=None):
        self.contexts += contexts
        out = []
        for c in contexts:
            key = next(k for k in self.answers if k in c)
            out.append(self.answers[key])
        return out


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("dllmq") is DLLMQLM


def test_presets_follow_qdlm_and_can_be_overridden():
    shots, g, mc, chat = resolve_settings("gsm8k")
    assert (shots, g.gen_length, g.steps, g.block_length) == (4, 256, 256, 32) and chat is False
    shots, g, mc, _ = resolve_settings("humaneval")
    assert (shots, g.gen_length, g.steps, g.block_length) == (0, 512, 512, 32)
    assert resolve_settings("mmlu_anatomy")[0] == 5 and resolve_settings("mmlu")[2] == 1
    assert resolve_settings("arc_challenge")[2] == 128
    shots, g, mc, _ = resolve_settings("gsm8k", num_fewshot=0, steps=64, mc_num=4)
    assert (shots, g.steps, g.gen_length, mc) == (0, 64, 256, 4)


def test_tiny_tasks_score_through_the_registered_class(bundled):
    """An oracle that returns the reference answers scores 100%; a wrong one 0% (math and code)."""
    m, tok = bundled
    math_rows, code_rows = load_task("tiny-math", 5), load_task("tiny-code", 5)
    right = {r["question"]: r["solution"] for r in math_rows} | {r["prompt"].strip(): r["canonical_solution"] for r in code_rows}
    lm = DLLMQLM.from_evaluator(OracleEngine(m, tok, right))
    assert run_harness_task(lm, "tiny-math", limit=5).value == 1.0
    assert run_harness_task(lm, "tiny-code", limit=5, allow_exec=True).value == 1.0
    # chat template applied for the tiny tasks (the bundled model is Instruct-style)
    assert all(c.startswith(tok.bos_token) and "<|start_header_id|>assistant" in c for c in lm.ev.contexts)
    wrong = {k: "#### 999999" if "####" in v else "    return None\n" for k, v in right.items()}
    lm = DLLMQLM.from_evaluator(OracleEngine(m, tok, wrong))
    assert run_harness_task(lm, "tiny-math", limit=5).value == 0.0
    assert run_harness_task(lm, "tiny-code", limit=5, allow_exec=True).value == 0.0


def test_multiple_choice_is_the_mc_elbo(bundled):
    """tiny-mc through lm-eval gives each choice the same ELBO as calling the likelihood directly."""
    m, tok = bundled
    res = run_task("tiny-mc", m, tok, limit=2, mc_num=4)
    assert res.n == 2 and res.metric == "acc"
    row = load_task("tiny-mc", 1)[0]
    ev = DiffusionEvaluator(m, tok, EngineConfig(mc_num=4, batch_size=4))
    ctx, cont = ev.encode_pair(row["context"], row["continuations"][0])
    assert ctx == tok(row["context"], add_special_tokens=False).input_ids
    direct = mc_loglikelihood(m.aligned_logits, torch.tensor(ctx), torch.tensor(cont), m.mask_token_id, mc_num=4,
                              batch_size=4, generator=torch.Generator().manual_seed(0))
    assert res.samples[0]["loglik"][0] == pytest.approx(direct, rel=1e-4)


def _qa_data(tmp_path, n):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"What is {i} + 1?", "a": str(i + 1), "choices": [str(i + 1), "zero"],
                                          "label": 0}) for i in range(n)))
    return data


def _write_mc_task(tmp_path, name, data):
    """A plain lm-eval multiple-choice YAML task over a local jsonl file."""
    (tmp_path / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")


def test_lm_eval_task_with_local_data(bundled, tmp_path):
    """A plain lm-eval YAML task over a local jsonl runs through our class (loglikelihood + generate_until)."""
    from lm_eval.tasks import TaskManager

    m, tok = bundled
    data = _qa_data(tmp_path, 4)
    _write_mc_task(tmp_path, "local_mc", data)
    (tmp_path / "local_gen.yaml").write_text(f"""task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""")
    tm = TaskManager(include_path=str(tmp_path))
    lm = DLLMQLM.from_evaluator(DiffusionEvaluator(m, tok, EngineConfig(batch_size=4)))
    r = run_harness_task(lm, "local_mc", mc_num=2, task_manager=tm)
    assert r.n == 4 and r.metric == "acc" and 0.0 <= r.value <= 1.0 and r.settings["mc_num"] == 2
    r = run_harness_task(lm, "local_gen", steps=8, gen_length=8, block_length=8, task_manager=tm)
    assert r.n == 4 and r.metric == "exact_match"
    assert all("\n" not in s["output"] for s in r.samples)  # cut at `until`
    assert r.settings["generation"]["gen_length"] == 8


def test_unknown_task_is_one_line(bundled):
    m, tok = bundled
    with pytest.raises(UserError, match="unknown task"):
        run_task("no_such_task_xyz", m, tok)


def test_unreachable_dataset_names_it(bundled, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    m, tok = bundled
    with pytest.raises(UserError, match=r"allenai/ai2_arc \(ARC-Easy\).*load_dataset"):
        run_task("arc_easy", m, tok, limit=1, mc_num=1)


def test_degradation_levels():
    assert degradation_level(0.5, 0.499) == "negligible"
    assert degradation_level(0.5, 0.49) == "moderate"  # 2% relative
    assert degradation_level(0.5, 0.47) == "significant"  # 6% relative
    assert degradation_level(0.5, 0.6) == "negligible"


def test_eval_output_and_compare(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    code, _, err = run_cli(["eval", "tiny", "--tasks", "tiny-mc", "--limit", "8", "--mc-num", "2",
                            "--output", a], capsys)
    assert code == 0, err
    assert "%|" not in err and "fatal" not in err  # lm-eval's tqdm bars and git probe stay quiet
    doc = json.loads(a.read_text())
    t = doc["models"][0]["tasks"]["tiny-mc"]
    assert t["n"] == 8 and "stderr" in t and len(t["samples"]) == 8 and t["settings"]["mc_num"] == 2
    assert doc["versions"]["torch"] and doc["command"].startswith("dllmq eval")
    # a copy with a lower score shows the delta and QDLM's level
    v0 = t["value"]
    doc["models"][0]["tasks"]["tiny-mc"]["value"] = v0 - 0.25
    b.write_text(json.dumps(doc))
    code, out, err = run_cli(["eval", "--compare", a, b, "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert [m["tasks"]["tiny-mc"]["value"] for m in res["models"]] == [v0, v0 - 0.25]
    code, out, err = run_cli(["eval", "--compare", a, b], capsys)
    assert code == 0 and "-25.0" in out and "significant" in out
    code, _, err = run_cli(["eval", "--compare", a], capsys)
    assert code == 2 and "two arguments" in err
    code, _, err = run_cli(["eval", "--compare", a, tmp_path / "nope.json"], capsys)
    assert code == 2 and "--tasks" in err and "Traceback" not in err


def test_lm_eval_own_cli_finds_our_class(tmp_path):
    """`dllmq-lm-eval` is lm-eval's CLI with the dllmq class registered (plain `lm_eval` cannot import it)."""
    import subprocess
    import sys

    _write_mc_task(tmp_path, "cli_mc", _qa_data(tmp_path, 2))
    out = tmp_path / "res"
    p = subprocess.run([sys.executable, "-m", "dllmq.evaluation.lm_eval_cli", "--model", "dllmq", "--model_args",
                        "pretrained=tiny,mc_num=2", "--tasks", "cli_mc", "--include_path", str(tmp_path),
                        "--output_path", str(out)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(next(out.rglob("results*.json")).read_text())
    assert res["results"]["cli_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert res["config"]["model"] == "dllmq"
