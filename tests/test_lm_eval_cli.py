"""`dllmq-lm-eval` (lm-eval's own CLI with dllmq's class) finds the bundled tasks, and `dllmq eval --output-format
lm-eval` writes lm-eval's results schema."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from cli_helpers import run_cli  # noqa: E402


def test_lm_eval_cli_runs_a_bundled_task(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dllmq.evaluation.lm_eval_cli", "--model", "dllmq", "--model_args",
                        "pretrained=tiny,mc_num=2", "--tasks", "tiny-mc", "--limit", "4",
                        "--output_path", str(tmp_path / "res")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tiny-mc" in p.stdout and "acc" in p.stdout  # lm-eval's result table
    assert "fatal: not a git repository" not in p.stderr
    res = json.loads(next((tmp_path / "res").rglob("results*.json")).read_text())
    assert res["results"]["tiny-mc"]["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert res["n-samples"]["tiny-mc"]["effective"] == 4


def test_bundled_tasks_join_any_include_path(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from dllmq.evaluation import harness

    monkeypatch.setattr(TaskManager, "__init__", TaskManager.__init__)  # restored after the test
    harness.include_tiny_tasks()
    harness.include_tiny_tasks()  # idempotent
    tm = TaskManager(None, str(tmp_path))  # the user's --include_path (positional, a str) is kept, ours added
    assert list(map(str, tm.include_path)) == [str(tmp_path), harness.tiny_task_dir()]
    assert sorted(tm.match_tasks(["tiny-math", "tiny-code", "tiny-mc"])) == ["tiny-code", "tiny-math", "tiny-mc"]


def test_eval_output_in_lm_eval_schema(tmp_path, capsys):
    from lm_eval.utils import make_table

    f = tmp_path / "lm.json"
    code, _, err = run_cli(["eval", "tiny", "--tasks", "tiny-mc", "--limit", "4", "--mc-num", "2", "--output", f,
                            "--output-format", "lm-eval"], capsys)
    assert code == 0, err
    doc = json.loads(f.read_text())
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"):
        assert "tiny-mc" in doc[key] or key == "config", key
    r = doc["results"]["tiny-mc"]
    assert 0.0 <= r["acc,none"] <= 1.0 and isinstance(r["acc_stderr,none"], float)  # not lm-eval's "N/A"
    assert doc["n-samples"]["tiny-mc"]["effective"] == 4 and doc["n-shot"]["tiny-mc"] == 0
    assert doc["config"]["model"] == "dllmq" and doc["config"]["model_args"] == "pretrained=tiny"
    assert doc["configs"]["tiny-mc"]["output_type"] == "multiple_choice"
    assert "tiny-mc" in make_table(doc)  # lm-eval's own tools read it
    # the default format is unchanged, and the schema needs task results
    code, _, err = run_cli(["eval", "tiny", "--output-format", "lm-eval"], capsys)
    assert code == 2 and "--tasks" in err
    code, _, err = run_cli(["eval", "tiny", "--tasks", "tiny-mc", "--output-format", "csv"], capsys)
    assert code == 2 and "dllmq or lm-eval" in err


def test_lm_eval_schema_from_older_results():
    """Results without lm-eval's raw output (an older --output file) still convert, from dllmq's own fields."""
    from dllmq.evaluation.lm_eval_schema import to_lm_eval

    res = {"models": [{"label": "model", "model": "x", "tasks": {"gsm8k": {
        "metric": "exact_match", "value": 0.5, "stderr": 0.1, "n": 10, "seconds": 2.0,
        "settings": {"num_fewshot": 4}}}}], "config": {"batch_size": 8, "device": "cpu", "limit": 10}}
    doc = to_lm_eval(res)
    assert doc["results"]["gsm8k"]["exact_match,none"] == 0.5 and doc["n-shot"]["gsm8k"] == 4
    assert doc["config"]["limit"] == 10 and doc["n-samples"]["gsm8k"]["effective"] == 10


def test_lm_eval_cli_model_draws_its_own_bar_dllmq_eval_does_not():
    """Made by lm-eval's CLI (model_args), the class shows per-request progress itself (on a terminal);
    under `dllmq eval` it adds a line to dllmq's display instead."""
    from dllmq.evaluation.harness import DLLMQLM

    lm = DLLMQLM(pretrained="tiny", device="cpu", dtype="float32")
    assert lm.show_progress
    assert not DLLMQLM.from_evaluator(lm.ev).show_progress
