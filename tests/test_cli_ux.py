"""CLI usability (issue 16): summarized per-layer tables, one flag name per concept (old names still work),
bench ratios in words, piped `info` within the terminal width, one quoted PROMPT, `inspect --plot` without
matplotlib, `eval --no-baseline`. Every bad input: one line, exit 2, no traceback."""

import json
import re
import tomllib
from pathlib import Path

import pytest

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _one_line(code, err, expect=2):
    assert code == expect, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def ckpt(tiny_llada, tmp_path_factory):
    out = tmp_path_factory.mktemp("ux") / "w4"
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import quantize
    from dllmq.quantization.spec import WeightSpec

    quantize(tiny_llada, QuantizationConfig("rtn", WeightSpec(4, True, "group", 32),
                                            ignore=[r"model\.transformer\.ff_out"]), out, show_progress=False)
    return out


def _layer_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if "model.transformer.blocks." in line]


# 1. per-layer tables: the worst layers, the mean and totals; --verbose for every row

def test_layer_table_summarizes_224_layers(capsys):
    from rich.console import Console

    from dllmq.ui import layer_table

    layers = [{"name": f"model.transformer.blocks.{i // 7}.l{i % 7}", "shape": [4096, 4096],
               "rel_error": (i * 37 % 224) / 1000, "seconds": 0.5} for i in range(224)]
    con = Console(width=120)
    layer_table("Per layer", layers, console=con)
    out = capsys.readouterr().out
    rows = _layer_rows(out)
    assert len(rows) == 10
    errors = [float(r.split("│")[3]) for r in rows]
    assert errors == sorted(errors, reverse=True) and errors[0] == pytest.approx(0.223)
    assert "the 10 worst of 224 layers" in out and "--verbose" in out
    assert "mean of 224 layers" in out and "total of 224 layers" in out and "112.000" in out  # 224 x 0.5 s
    assert "3.8G weights" in out
    layer_table("Per layer", layers, verbose=True, console=con)
    out = capsys.readouterr().out
    assert len(_layer_rows(out)) == 224 and "worst" not in out and "mean of 224 layers" in out


def test_quantize_and_info_show_the_summary_by_default(ckpt, tiny_llada, tmp_path, capsys):
    code, out, err = run_cli(["quantize", tiny_llada, "--group-size", "32", "--out", tmp_path / "q"], capsys)
    assert code == 0, err
    assert len(_layer_rows(out)) == 10 and "the 10 worst of 14 layers" in out and "mean of 14 layers" in out
    code, out, err = run_cli(["quantize", tiny_llada, "--group-size", "32", "--out", tmp_path / "q", "--overwrite",
                              "--verbose"], capsys)
    assert code == 0, err
    assert len(_layer_rows(out)) == 14 and "worst" not in out
    code, out, err = run_cli(["info", ckpt], capsys)
    assert code == 0, err
    assert len(_layer_rows(out)) == 10 and "total of 14 layers" in out
    code, out, err = run_cli(["info", ckpt, "-v"], capsys)
    assert code == 0, err
    assert len(_layer_rows(out)) == 14


# 2. one name per concept; the old names are hidden, deprecated, and still work

def _help(capsys, *cmd) -> str:
    code, out, err = run_cli([*cmd, "--help"], capsys)
    assert code == 0, err
    return out


def test_help_shows_only_the_new_names(capsys):
    q = _help(capsys, "quantize")
    assert "--calib-seq-len" in q and "--calib-seqlen" not in q and "--calib-samples" in q
    i = _help(capsys, "inspect")
    assert "--calib-samples" in i and "--calib-seq-len" in i
    assert not re.search(r"--samples\b", i) and not re.search(r"--seq-len\b", i.replace("--calib-seq-len", ""))
    b = _help(capsys, "bench")
    assert "--batch-size" in b and not re.search(r"--batch\b(?!-)", b)
    e = _help(capsys, "export")
    assert "--overwrite" in e


def test_quantize_old_calib_seqlen_still_works(monkeypatch, capsys):
    import dllmq.recipe as recipe
    from dllmq.errors import UserError

    seen = {}

    def fake_run(model, rec, *a, **k):
        seen["seq_len"] = rec.calibration.seq_len
        raise UserError("stopped by the test")

    monkeypatch.setattr(recipe, "run", fake_run)
    code, out, err = run_cli(["quantize", "tiny", "--calib-seqlen", "48"], capsys)
    assert code == 2 and seen["seq_len"] == 48
    assert "--calib-seqlen is deprecated; use --calib-seq-len" in err
    code, out, err = run_cli(["quantize", "tiny", "--calib-seq-len", "40"], capsys)
    assert seen["seq_len"] == 40 and "deprecated" not in err


@pytest.mark.parametrize("args,message", [
    (["quantize", "tiny", "--calib-seq-len", "0"], "--calib-seq-len must be positive"),
    (["quantize", "tiny", "--calib-seqlen", "0"], "--calib-seqlen must be positive"),  # the flag the user typed
    (["quantize", "tiny", "--calib-seq-len", "16", "--calib-seqlen", "16"], "give only --calib-seq-len"),
    (["inspect", "tiny", "--calib-samples", "0"], "--calib-samples must be positive"),
    (["inspect", "tiny", "--samples", "0"], "--samples must be positive"),
    (["inspect", "tiny", "--seq-len", "-1"], "--seq-len must be positive"),
    (["inspect", "tiny", "--samples", "2", "--calib-samples", "2"], "give only --calib-samples"),
    (["bench", "tiny", "--batch-size", "0"], "--batch-size must be positive"),
    (["bench", "tiny", "--batch", "0"], "--batch must be positive"),
    (["bench", "tiny", "--batch", "2", "--batch-size", "2"], "give only --batch-size"),
    (["quantize", "tiny", "--revision", "v1"], "--revision"),
    (["eval", "tiny", "--no-baseline", "--against", "tiny"], "--no-baseline"),
    (["eval", "--compare", "a.json", "b.json", "--no-baseline"], "--no-baseline"),
    (["generate", "tiny", "what", "is", "2"], "quote the prompt"),
])
def test_bad_input_one_line_exit_2(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    _one_line(code, err)
    assert message in err


def test_inspect_old_names_still_work(tiny_llada, capsys):
    code, out, err = run_cli(["inspect", tiny_llada, "--samples", "2", "--seq-len", "16", "--json"], capsys)
    assert code == 0, err
    assert "summary" in json.loads(out)
    assert "--samples is deprecated" in err and "--seq-len is deprecated" in err


def test_export_overwrite(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ct"
    code, _, err = run_cli(["export", ckpt, "--out", out], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", ckpt, "--out", out], capsys)
    _one_line(code, err)
    assert "--overwrite" in err
    (out / "marker").write_text("old")
    # a failed export leaves the old folder as it was
    import dllmq.checkpoint.export_ct as ect
    from dllmq.errors import UserError

    real = ect.export_compressed_tensors

    def fail(*a, **k):
        raise UserError("export failed (test)")

    monkeypatch.setattr(ect, "export_compressed_tensors", fail)
    code, _, err = run_cli(["export", ckpt, "--out", out, "--overwrite"], capsys)
    _one_line(code, err)
    assert (out / "marker").read_text() == "old"
    monkeypatch.setattr(ect, "export_compressed_tensors", real)
    code, stdout, err = run_cli(["export", ckpt, "--out", out, "--overwrite", "--json"], capsys)
    assert code == 0, err
    assert not (out / "marker").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]  # nothing left beside it
    # --overwrite never deletes the checkpoint or a folder above the current one
    code, _, err = run_cli(["export", ckpt, "--out", ckpt.parent, "--overwrite"], capsys)
    _one_line(code, err)
    assert ckpt.exists()


# 3. bench: ratios in words, in the right direction

def test_ratio_words():
    from dllmq.evaluation.speed import size_ratio_text, throughput_ratio_text, time_ratio_text

    assert time_ratio_text(2.0) == "2.00× slower" and time_ratio_text(0.5) == "2.00× faster"
    assert throughput_ratio_text(2.0) == "2.00× faster" and throughput_ratio_text(0.25) == "4.00× slower"
    assert size_ratio_text(0.25) == "4.00× smaller" and size_ratio_text(1.5) == "1.50× larger"
    assert time_ratio_text(1.001) == "same (1.00×)" and time_ratio_text(None) == "-"


def test_bench_table_says_faster_or_slower(monkeypatch, capsys):
    import dllmq.evaluation.speed as speed

    seen = {}

    def fake_bench(model, **kw):
        seen.update(kw)
        res = {"models": {"quantized": model, "full precision": "tiny"}, "config": {"device": "cpu"},
               "step_ms": {"quantized": 10.0, "full precision": 20.0},  # quantized step: 2x faster
               "generation_tok_s": {"quantized": 5.0, "full precision": 10.0},  # quantized: 2x slower
               "resident_weight_bytes": {"quantized": 1 << 20, "full precision": 4 << 20}, "peak_bytes": {},
               "layers": [{"layer": "q_proj", "shape": "8x8", "kernel": "dequant", "fp_ms": 1.0, "q_ms": 3.0,
                           "ratio": 3.0}]}
        res["ratios"] = speed.ratios(res)
        return res

    monkeypatch.setattr(speed, "bench", fake_bench)
    code, out, err = run_cli(["bench", "x", "--batch", "3", "--no-fast"], capsys)
    assert code == 0, err
    assert seen["batch"] == 3 and "--batch is deprecated" in err
    step = next(line for line in out.splitlines() if "denoising step" in line)
    gen = next(line for line in out.splitlines() if "generation (tok/s)" in line)
    assert "2.00× faster" in step and "2.00× slower" in gen
    assert "4.00× smaller" in out and "3.00× slower" in out and "q/fp" not in out


# 4. piped info: the terminal's width (or 100 columns), sizes in KiB/MiB/GiB

def test_piped_info_fits_and_shows_human_sizes(ckpt, monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    code, out, err = run_cli(["info", ckpt], capsys)
    assert code == 0, err
    assert max(map(len, out.splitlines())) <= 100
    assert re.search(r"weights on disk\s*│\s*[\d.]+ (KiB|MiB)", out)
    raw = json.loads(run_cli(["info", ckpt, "--json"], capsys)[1])["weights_bytes"]
    assert str(raw) not in out  # no raw byte counts in the table (the JSON keeps them)
    monkeypatch.setenv("COLUMNS", "72")
    code, out, err = run_cli(["info", ckpt], capsys)
    assert code == 0 and max(map(len, out.splitlines())) <= 72


# 5. generate: the prompt is one argument

def test_generate_takes_one_quoted_prompt(tiny_llada, capsys):
    code, out, err = run_cli(["generate", tiny_llada, "what is 2 + 2", "--steps", "8", "--gen-length", "8",
                              "--block-length", "8", "--json"], capsys)
    assert code == 0, err
    assert [o["prompt"] for o in json.loads(out)["outputs"]] == ["what is 2 + 2"]
    code, out, err = run_cli(["generate", "tiny", "what", "is", "2 + 2"], capsys)
    _one_line(code, err)
    assert "dllmq generate tiny 'what is 2 + 2'" in err


# 6. inspect --plot: matplotlib is checked first; it is the `plot` extra, which `make demo` installs

def test_inspect_plot_without_matplotlib_fails_first(monkeypatch, tmp_path, capsys):
    import importlib.util

    import dllmq.runtime.loader as loader

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    code, out, err = run_cli(["inspect", "tiny", "--plot", tmp_path / "plots"], capsys)
    _one_line(code, err)
    assert "pip install 'dllmq[plot]'" in err and not (tmp_path / "plots").exists()


def test_plot_extra_and_make_demo():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["plot"])
    demo = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert ".[plot]" in demo


# 7. eval --no-baseline: full precision is not re-run; the results files compare later

def test_eval_no_baseline_then_compare_files(ckpt, tiny_llada, monkeypatch, tmp_path, capsys):
    import dllmq.evaluation.report as report

    runs = []

    def fake_evaluate(entries, tasks, **kw):
        runs.append([label for label, _ in entries])
        return {"models": [{"label": label, "model": str(name),
                            "tasks": {t: {"metric": "acc", "n": 4, "value": 0.25 if "w4" in str(name) else 0.5,
                                          "stderr": 0.1} for t in tasks}}
                           for label, name in entries],
                "config": {"tasks": tasks}}

    monkeypatch.setattr(report, "evaluate_tasks", fake_evaluate)
    w4, fp = tmp_path / "w4.json", tmp_path / "fp.json"
    code, out, err = run_cli(["eval", ckpt, "--tasks", "tiny-mc", "--no-baseline", "--output", w4], capsys)
    assert code == 0, err
    assert runs[-1] == ["model"]  # the base model (tiny_llada, in the manifest) was not evaluated
    code, out, err = run_cli(["eval", ckpt, "--tasks", "tiny-mc", "--output", tmp_path / "both.json"], capsys)
    assert runs[-1] == ["full precision", "quantized"]  # the default still runs the baseline
    code, out, err = run_cli(["eval", tiny_llada, "--tasks", "tiny-mc", "--output", fp], capsys)
    assert code == 0, err
    n = len(runs)
    code, out, err = run_cli(["eval", "--compare", fp, w4], capsys)
    assert code == 0, err
    assert len(runs) == n and "fp.json" in out and "w4.json" in out and "-25.0" in out


def test_eval_nll_no_baseline(ckpt, capsys):
    code, out, err = run_cli(["eval", ckpt, "--no-baseline", "--max-seqs", "2", "--seq-len", "32", "--mc-num", "1",
                              "--prompts", "0", "--json"], capsys)
    assert code == 0, err
    assert [m["label"] for m in json.loads(out)["models"]] == ["quantized"]
