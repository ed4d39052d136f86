"""benchmarks/gpu_check.py --dry-run: runs on CPU, writes every step's status, imports nothing that the GPU
machine lacks (lm_eval, datasets, compressed_tensors are blocked in the subprocess and its children)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("cuda_tests", "triton_correctness", "qlinear_speed", "quantize_4block", "bench")

BLOCKER = '''import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lm_eval", "datasets", "compressed_tensors"):
            raise ImportError("blocked: the GPU machine has no " + name)
        return None
sys.meta_path.insert(0, _Block())
'''


def test_gpu_check_dry_run(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)  # inherited by the script's pytest / quantize subprocesses
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["dry_run"] is True and res["env"]["torch"]
    for step in STEPS:
        s = res["steps"][step]
        assert s["status"] and s["status"] not in ("pending", "running"), (step, s)
        assert isinstance(s["seconds"], float | int)
        assert s["status"] != "error", (step, s.get("error"), s.get("traceback"))

    qs = res["steps"]["qlinear_speed"]
    assert qs["status"] == "ok", qs
    timed = [v for r in qs["rows"] for v in r.values() if isinstance(v, dict) and "ms" in v]
    assert timed and all(v["ms"] > 0 and v["ratio"] > 0 for v in timed)
    assert all(r["bf16_ms"] > 0 for r in qs["rows"])

    qb = res["steps"]["quantize_4block"]
    assert qb["status"] == "ok", qb
    assert {m["method"] for m in qb["methods"]} == {"rtn", "gptq", "duquant"}
    assert all(m["status"] == "ok" and m["quantize_seconds"] > 0 for m in qb["methods"]), qb["methods"]

    bench = res["steps"]["bench"]
    assert bench["status"] == "ok", bench
    assert any(i.get("ratios", {}).get("step_time", 0) > 0 for i in bench["items"])

    md = (out / "gpu_check.md").read_text()
    assert "| step | status | seconds | budget s |" in md and "|---|" in md
    assert "quantize_4block" in md and "qlinear_speed" in md
