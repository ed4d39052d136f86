"""The scripts in examples/ run on the bundled `tiny` model (each in a fresh process) and say what they did."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, *args, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HF_TOKEN", None)
    p = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    return p.stdout


def test_quantize_with_recipe(tmp_path):
    out = _run("quantize_with_recipe.py", "--out", tmp_path / "q", cwd=tmp_path)
    import json

    from dllmq.models.loading import BUNDLED_DIR

    blocks = json.loads((BUNDLED_DIR / "tiny-llada" / "config.json").read_text())["n_layers"]
    assert f"wrote {tmp_path / 'q'}: {7 * blocks} layers" in out  # q, k, v, o, gate, up, down per block
    assert "method: gptq" in out and "scale_search: minmax" in out and "damp: 0.01" in out  # the recorded recipe
    assert (tmp_path / "q" / "dllmq_manifest.json").exists()


def test_generate(tmp_path):
    out = _run("generate.py", cwd=tmp_path)
    lines = out.splitlines()
    assert lines[0] == "> What is 12 + 30?" and "> Name a colour." in lines and len(lines) == 6
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint is gone


def test_evaluate(tmp_path):
    out = _run("evaluate.py", cwd=tmp_path)
    rows = [ln for ln in out.splitlines() if "NLL" in ln]
    assert len(rows) == 2 and rows[0].strip().startswith("full precision:") and "quantized:" in rows[1]
    assert "step agreement" in rows[1] and "generation agreement" in rows[1]


def test_push_dry_run(tmp_path):
    out = _run("push_dry_run.py", "--repo-id", "someone/tiny-w4", cwd=tmp_path)
    assert "to someone/tiny-w4 @ main" in out
    assert "dllmq_manifest.json" in out and "README.md" in out and "library_name: dllmq" in out


@pytest.mark.parametrize("name", ["quantize_with_recipe.py", "generate.py", "evaluate.py", "push_dry_run.py",
                                  "recipe.yaml"])
def test_example_exists(name):
    assert (EXAMPLES / name).is_file()
