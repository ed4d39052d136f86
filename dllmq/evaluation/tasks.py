"""The offline task suite shipped with dllmq: tiny-math, tiny-code, tiny-mc.

They mirror the categories the dLLM quantization papers report (GSM8K-style math, HumanEval/
MBPP-style code, ARC/MMLU-style multiple choice) and are scored by the same code paths as the
real benchmarks: generation with the diffusion sampler + exact match / pass@1, and multiple
choice by the Monte-Carlo likelihood. The data are held-out items of dllmq.data.synthetic,
disjoint from the bundled model's training data by construction.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass

import torch

from ..diffusion.generation import GenerationConfig, generate
from ..diffusion.likelihood import mc_loglikelihood_batch
from ..errors import UserError
from ..models.base import DiffusionLM
from ..models.loading import BUNDLED_DIR
from .execution import check_function

TASK_DIR = BUNDLED_DIR / "tasks"


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float
    stderr: float
    n: int
    seconds: float
    samples: list

    def to_dict(self, with_samples: bool = True) -> dict:
        d = dict(self.__dict__)
        if not with_samples:
            d.pop("samples")
        return d


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)), as lm-eval reports."""
    n = len(xs)
    if n == 0:
        return 0.0, 0.0
    m = sum(xs) / n
    if n == 1:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def load_task(name: str, limit: int | None = None) -> list[dict]:
    f = TASK_DIR / f"{name}.jsonl"
    if not f.exists():
        raise UserError(f"task data {f} is missing from this install; reinstall dllmq")
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


_ANSWER = re.compile(r"####\s*(-?[\d,]+)")


def extract_answer(text: str) -> int | None:
    m = _ANSWER.search(text)
    if m:
        try:
            return int(m.group(1).replace(",", ""))
        except ValueError:
            return None
    return None


def run_math(model, tok, gcfg: GenerationConfig, limit=None, batch_size=16) -> TaskResult:
    rows = load_task("tiny-math", limit)
    t0 = time.time()
    outs = generate(model, tok, [r["question"] for r in rows], gcfg, batch_size=batch_size)
    scores, samples = [], []
    for r, o in zip(rows, outs):
        pred = extract_answer(o["text"])
        ok = float(pred == r["answer"])
        scores.append(ok)
        samples.append({"question": r["question"], "target": r["answer"], "output": o["text"], "correct": bool(ok)})
    m, se = mean_stderr(scores)
    return TaskResult("tiny-math", "exact_match", m, se, len(rows), time.time() - t0, samples)


def code_completion(prompt: str, generated: str) -> str:
    """The model answers with the whole function (as trained); accept a bare body too."""
    if re.search(r"^\s*def\s", generated, re.M):
        return generated
    return prompt + generated


def run_code(model, tok, gcfg: GenerationConfig, limit=None, batch_size=16, allow_exec=False) -> TaskResult:
    if not allow_exec:
        raise UserError("tiny-code runs model-generated Python; pass --allow-code-execution to allow it")
    rows = load_task("tiny-code", limit)
    t0 = time.time()
    outs = generate(model, tok, [r["prompt"] for r in rows], gcfg, batch_size=batch_size)
    scores, samples = [], []
    for r, o in zip(rows, outs):
        prog = code_completion(r["prompt"], o["text"])
        ok, why = check_function(prog, r["test"], r["entry_point"])
        scores.append(float(ok))
        samples.append({"task_id": r["task_id"], "output": o["text"], "passed": ok, "reason": why})
    m, se = mean_stderr(scores)
    return TaskResult("tiny-code", "pass@1", m, se, len(rows), time.time() - t0, samples)


@torch.no_grad()
def run_mc(model: DiffusionLM, tok, limit=None, mc_num=8, batch_size=64, seed=0) -> TaskResult:
    rows = load_task("tiny-mc", limit)
    t0 = time.time()
    pairs, index = [], []
    for i, r in enumerate(rows):
        ctx = tok(r["context"], add_special_tokens=False).input_ids
        for j, cont in enumerate(r["continuations"]):
            ans = tok(cont, add_special_tokens=False).input_ids
            pairs.append((torch.tensor(ctx), torch.tensor(ans)))
            index.append((i, j))
    dev = next(model.parameters()).device
    pairs = [(p.to(dev), a.to(dev)) for p, a in pairs]
    g = torch.Generator(device="cpu").manual_seed(seed)
    lls = mc_loglikelihood_batch(model.aligned_logits, pairs, model.mask_token_id, pad_id=tok.eos_token_id,
                                 mc_num=mc_num, batch_size=min(mc_num, batch_size), generator=g, max_rows=batch_size)
    per = [[None] * len(r["continuations"]) for r in rows]
    for (i, j), ll in zip(index, lls):
        per[i][j] = ll
    scores, samples = [], []
    for r, ll in zip(rows, per):
        pred = max(range(len(ll)), key=lambda k: ll[k])
        scores.append(float(pred == r["label"]))
        samples.append({"question": r["question"], "label": r["label"], "pred": pred, "loglik": ll})
    m, se = mean_stderr(scores)
    return TaskResult("tiny-mc", "acc", m, se, len(rows), time.time() - t0, samples)


TASKS = ("tiny-math", "tiny-code", "tiny-mc")


def run_task(name: str, model, tok, gcfg: GenerationConfig, limit=None, mc_num=8, allow_exec=False,
             batch_size=16) -> TaskResult:
    if name == "tiny-math":
        return run_math(model, tok, gcfg, limit, batch_size)
    if name == "tiny-code":
        return run_code(model, tok, gcfg, limit, batch_size, allow_exec)
    if name == "tiny-mc":
        return run_mc(model, tok, limit, mc_num, seed=gcfg.seed)
    raise UserError(f"unknown task {name!r}; available: {', '.join(TASKS)}")


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["tiny"] or names == ["all"]:
        return list(TASKS)
    for n in names:
        if n not in TASKS:
            raise UserError(f"unknown task {n!r}; available: {', '.join(TASKS)} (or 'tiny' for all three)")
    return names
