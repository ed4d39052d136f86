"""The offline task suite shipped with dllmq: tiny-math, tiny-code, tiny-mc.

They mirror the categories the dLLM quantization papers report (GSM8K-style math, HumanEval/
MBPP-style code, ARC/MMLU-style multiple choice) and are scored by the same code paths as the
real benchmarks: they run as lm-eval tasks through dllmq's registered LM class (harness.py):
generation with the diffusion sampler + exact match / pass@1, and multiple choice by the
Monte-Carlo likelihood. The data are held-out items of dllmq.data.synthetic,
disjoint from the bundled model's training data by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..diffusion.generation import GenerationConfig
from ..errors import UserError
from .task_data import TASK_DIR, code_completion, extract_answer, load_task  # noqa: F401  (re-exported)


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float
    stderr: float
    n: int
    seconds: float
    samples: list
    settings: dict = field(default_factory=dict)

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





TASKS = ("tiny-math", "tiny-code", "tiny-mc")


def run_task(name: str, model, tok, gcfg: GenerationConfig | None = None, limit=None, mc_num=None, allow_exec=False,
             batch_size=16, num_fewshot=None, chat=None, fast: dict | None = None) -> TaskResult:
    """Evaluate `model` on a bundled task or any lm-eval task, through dllmq's registered lm-eval class.

    Settings not given (gcfg None, mc_num None, ...) come from the task's preset (harness.PRESETS).
    """
    if name == "tiny-code" and not allow_exec:
        raise UserError("tiny-code runs model-generated Python; pass --allow-code-execution to allow it")
    try:
        from .harness import DLLMQLM, run_harness_task
    except ImportError:
        raise UserError("task evaluation needs lm-evaluation-harness: pip install 'dllmq[eval]'") from None
    from .engine import DiffusionEvaluator, EngineConfig

    seed = gcfg.seed if gcfg else 0
    if fast is None and gcfg is not None and gcfg.fast:
        fast = {"cache": gcfg.cache, "threshold": gcfg.threshold}
    lm = DLLMQLM.from_evaluator(DiffusionEvaluator(model, tok, EngineConfig(batch_size=batch_size, seed=seed)))
    run = run_harness_task(lm, name, num_fewshot=num_fewshot, steps=gcfg and gcfg.steps,
                           gen_length=gcfg and gcfg.gen_length, block_length=gcfg and gcfg.block_length,
                           mc_num=mc_num, chat=chat, limit=limit, allow_exec=allow_exec, seed=seed, fast=fast)
    per_doc = [float(s[run.metric]) for s in run.samples if isinstance(s.get(run.metric), (int, float))]
    stderr = mean_stderr(per_doc)[1] if per_doc else run.stderr
    res = TaskResult(name, run.metric, run.value, stderr, run.n, run.seconds, run.samples)
    res.settings = run.settings
    return res


def parse_tasks(spec: str) -> list[str]:
    """Comma-separated task names; 'tiny' expands to the bundled suite. Other names are lm-eval tasks."""
    names = []
    for t in (t.strip() for t in spec.split(",")):
        if t in ("tiny", "all"):
            names += [x for x in TASKS if x not in names]
        elif t and t not in names:
            names.append(t)
    if not names:
        raise UserError("--tasks is empty; give e.g. tiny, tiny-math or gsm8k,arc_challenge")
    return names
