"""Progress bars with a truthful ETA (dllmq.ui) for calibration, quantization, generation, inspect and evaluation.

Progress goes to stderr and only to a terminal; the tests force it on with a rich Console(force_terminal=True)
writing into a buffer (ui.err_console, which ui.progress() reads when it runs)."""

import io
import re

import pytest
import torch
from rich.console import Console

from cli_helpers import run_cli
from dllmq import ui

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


@pytest.fixture
def term(monkeypatch):
    """A terminal-like stderr console; returns a function giving what was drawn so far, ANSI codes removed."""
    buf = io.StringIO()
    monkeypatch.setattr(ui, "err_console", Console(file=buf, force_terminal=True, width=200, color_system=None))
    return lambda: ANSI.sub("", buf.getvalue().replace("\r", "\n"))


def _hms(text: str) -> int:
    h, m, s = (int(x) for x in text.strip().split(":"))
    return 3600 * h + 60 * m + s


def test_eta_follows_work_done_not_the_last_burst():
    """The quantize bar's old ETA: rich's speed over the last 30 s of updates. When the units come in bursts
    (a block's linears are quantized back to back after the block's long forward passes), that window only
    holds the burst and the bar said "eta 0:00:01" through the whole next block. The ETA must reflect the work
    left: here 42 linears in 6 blocks of 30 s each."""
    now = [0.0]
    prog = ui.progress(True)
    prog.get_time = lambda: now[0]
    task = prog.add_task("quantize", total=42, info="")
    for block in range(2):  # two blocks done: 30 s of silence, then 7 advances within 0.1 s
        now[0] += 30.0
        for _ in range(7):
            now[0] += 0.014
            prog.update(task, advance=1)
    eta_col = prog.columns[-1]
    t = prog.tasks[0]
    first = _hms(eta_col.render(t).plain)
    now[0] += 20.0  # 20 s into the third block, no update since
    later = _hms(eta_col.render(t).plain)
    # 4 blocks of ~30 s are left at the last advance (rich's column said 0-1 s here)
    assert 100 <= first <= 140, first
    # and the estimate counts down while the block runs
    assert 80 <= later < first, (first, later)


def test_eta_by_blocks_counts_down_through_a_block():
    """The quantize bar counts blocks: 2 of 6 done in 60 s, 20 s into the third: 100 s left."""
    now = [0.0]
    prog = ui.progress(True)
    prog.get_time = lambda: now[0]
    task = prog.add_task("quantize", total=6, info="")
    for _ in range(2):
        now[0] += 30.0
        prog.update(task, advance=1)
    col, t = prog.columns[-1], prog.tasks[0]
    assert _hms(col.render(t).plain) == 120
    now[0] += 20.0
    assert _hms(col.render(t).plain) == 100
    now[0] += 40.0  # the block overruns: at least the 3 blocks after it remain
    assert _hms(col.render(t).plain) == 90


def test_eta_excludes_units_done_by_an_earlier_run():
    now = [0.0]
    prog = ui.progress(True)
    prog.get_time = lambda: now[0]
    task = prog.add_task("quantize", total=6, completed=3, done_before=3, info="")  # resumed after 3 blocks
    now[0] += 10.0
    prog.update(task, advance=1)  # one block in 10 s: 2 left, ~20 s
    assert 18 <= _hms(prog.columns[-1].render(prog.tasks[0]).plain) <= 22


def test_off_without_a_terminal_or_when_asked(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(ui, "err_console", Console(file=buf, width=200))  # not a terminal
    assert ui.progress(True).disable
    monkeypatch.setattr(ui, "err_console", Console(file=buf, force_terminal=True))
    assert ui.progress(False).disable and not ui.progress(True).disable
    with ui.bar("x", total=3) as b:  # no display: library code reports into the void
        b.advance(1)
        assert not b


def test_quantize_bar_counts_blocks_and_calibration_has_its_own(tiny_llada, tmp_path, term):
    from dllmq.calibration.states import TMASConfig
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import CalibOptions, quantize
    from dllmq.quantization.spec import WeightSpec

    qcfg = QuantizationConfig("gptq", WeightSpec(4, True, "group", 32), ignore=[r"model\.transformer\.ff_out"])
    calib = CalibOptions(samples=4, seq_len=32, batch_size=2, mask="tmas",
                         tmas=TMASConfig(gen_length=8, block_length=8, steps=4, states_per_prompt=2))
    res = quantize(tiny_llada, qcfg, tmp_path / "q", calib=calib, show_progress=True)
    out = term()
    n_blocks = len({r.name.rsplit(".", 1)[0] for r in res.layers})
    # TMAS sampling: one unit per batch and denoising step (2 batches x 4 steps), advanced block by block
    assert re.search(r"calibration \(TMAS\).* 8/8 ", out), out[-3000:]
    # quantization: one unit per block (its forward passes, its linears, its shard), not per linear
    last = [ln for ln in out.splitlines() if ln.startswith("quantize")][-1]
    assert f" {n_blocks}/{n_blocks} " in last and f"{len(res.layers)}/{len(res.layers)} linears" in last, last
    assert f"block {n_blocks}/{n_blocks} " in last  # the block and stage being worked on are named


def test_generate_advances_per_step(term, monkeypatch):
    from dllmq.diffusion.generation import GenerationConfig, generate
    from dllmq.models.loading import load_model, load_tokenizer, resolve_model_path

    p = resolve_model_path("tiny")
    m, tok = load_model(p, dtype=torch.float32), load_tokenizer(p)
    advances = []
    real = ui.Bar.advance
    monkeypatch.setattr(ui.Bar, "advance", lambda self, n=1, info=None: advances.append(n) or real(self, n, info))
    cfg = GenerationConfig(steps=8, gen_length=8, block_length=8)
    generate(m, tok, ["What is 1 + 1?", "Say hi."], cfg, batch_size=1, show_progress=True)
    assert advances == [1] * 16  # 2 batches x 8 denoising steps
    assert re.search(r"generate .* 16/16 ", term())


def test_cli_generate_and_inspect_show_bars_and_json_does_not(term, capsys):
    code, _, err = run_cli(["generate", "tiny", "Hi", "--steps", "8", "--gen-length", "8", "--block-length", "8"],
                           capsys)
    assert code == 0, err
    assert re.search(r"generate .* 8/8 ", term())
    code, _, err = run_cli(["inspect", "tiny", "--calib-samples", "16", "--calib-seq-len", "32"], capsys)
    assert code == 0, err
    assert re.search(r"inspect .* 2/2 .*block \d+/\d+", term())  # 2 batches of 8, advanced block by block
    before = term()
    code, out, err = run_cli(["inspect", "tiny", "--calib-samples", "8", "--calib-seq-len", "16", "--json"], capsys)
    assert code == 0, err
    assert term() == before and out.lstrip().startswith("{")


def test_eval_progress_is_per_request_not_per_task(monkeypatch):
    """`dllmq eval --tasks` draws one line per task whose total is the task's requests, advanced as the
    forwards go by (not once per task, not once per batch of requests)."""
    pytest.importorskip("lm_eval")
    from dllmq.evaluation.engine import DiffusionEvaluator, EngineConfig
    from dllmq.evaluation.harness import DLLMQLM, run_harness_task
    from dllmq.models.loading import load_model, load_tokenizer, resolve_model_path

    p = resolve_model_path("tiny")
    m, tok = load_model(p, dtype=torch.float32), load_tokenizer(p)
    lm = DLLMQLM.from_evaluator(DiffusionEvaluator(m, tok, EngineConfig(batch_size=16, seed=0)))
    steps = []
    lm.on_batch = steps.append
    prog = ui.progress(True, console=Console(file=io.StringIO(), force_terminal=True))
    added = []
    real_add = prog.add_task
    monkeypatch.setattr(prog, "add_task", lambda d, **kw: added.append((d, kw["total"])) or real_add(d, **kw))
    with prog:
        r = run_harness_task(lm, "tiny-mc", mc_num=4, limit=4)
    n_requests = sum(len(s["loglik"]) for s in r.samples)
    assert added == [("tiny-mc", n_requests)]
    assert abs(sum(steps) - n_requests) < 1e-6
    assert len(steps) > 1  # one batch of 16 requests, yet several advances: per forward
    assert not prog.tasks  # the per-task line goes when the task is done


def test_nll_eval_shows_one_bar_per_model(term, capsys, tmp_path):
    """`dllmq eval CKPT` (NLL + agreement, no --tasks): a line per model that ends complete, none with --json."""
    from dllmq.evaluation.report import compare_models

    res = compare_models("tiny", max_seqs=2, seq_len=32, mc_num=1, n_prompts=2, steps=4, gen_length=4, block_length=4)
    assert len(res["models"]) == 1
    # 2 windows for NLL + 2 for step predictions + 1 generation batch x 4 steps = 8 units
    assert re.search(r"model .* 8/8 .*done", term())
    before = term()
    compare_models("tiny", max_seqs=2, seq_len=32, mc_num=1, n_prompts=2, steps=4, gen_length=4, block_length=4,
                   show_progress=False)
    assert term() == before


def test_bench_bar_advances_per_timed_call(term, tmp_path):
    """`dllmq bench`: one bar whose total is the number of timed calls, so its ETA follows the work."""
    from dllmq.evaluation.speed import bench

    res = bench("tiny", batch=1, seq_len=16, gen_length=4, steps=4, block_length=4, repeats=2, fast=False,
                memory=False, show_progress=True)
    assert res["step_ms"]
    # no reference for a full-precision model: (1 + 2) step calls + (1 + 1) generation calls = 5
    assert re.search(r"bench .* 5/5 ", term())
