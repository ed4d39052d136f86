"""lm-evaluation-harness integration: our LM class, the QDLM presets and the bundled tiny tasks as lm-eval tasks.

`DLLMQLM` is registered with lm-eval as ``dllmq``, so both of these work:

    dllmq eval ./llada-w4 --tasks gsm8k,arc_challenge
    dllmq-lm-eval --model dllmq --model_args pretrained=./llada-w4,mc_num=128 --tasks arc_easy
    accelerate launch -m dllmq.evaluation.lm_eval_cli --model dllmq --model_args pretrained=./llada-w4 --tasks gsm8k   # data parallel

The class adapts lm-eval's requests to `DiffusionEvaluator` (engine.py). lm-eval has no notion of a diffusion
sampler's settings, so the per-task settings (shots, gen_length, steps, block_length, mc_num) come from
`PRESETS` (the QDLM paper's setup) and can be overridden one by one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..diffusion.generation import GenerationConfig
from ..errors import UserError
from .engine import DiffusionEvaluator, EngineConfig


@dataclass(frozen=True)
class Preset:
    num_fewshot: int | None = 0
    gen_length: int | None = None
    steps: int | None = None
    block_length: int | None = None
    mc_num: int | None = None
    chat: bool | None = False  # None: use the chat template when the tokenizer has one


_MC = Preset(num_fewshot=0, mc_num=128)
# QDLM (arXiv 2508.14896) evaluation setup; see ../shared/reference/dllm-quant-papers.md.
PRESETS: dict[str, Preset] = {
    "gsm8k": Preset(4, 256, 256, 32),
    "minerva_math": Preset(0, 256, 256, 64),
    "hendrycks_math": Preset(0, 256, 256, 64),
    "humaneval": Preset(0, 512, 512, 32),
    "mbpp": Preset(3, 512, 512, 32),
    "arc_challenge": _MC, "arc_easy": _MC, "hellaswag": _MC, "piqa": _MC, "winogrande": _MC,
    "mmlu": Preset(num_fewshot=5, mc_num=1),
    # the bundled tasks: chat prompts (the bundled model is an Instruct-style model)
    "tiny-math": Preset(0, 64, 64, 32, chat=None),
    "tiny-code": Preset(0, 64, 64, 32, chat=None),
    "tiny-mc": Preset(0, mc_num=8),
}
DEFAULT_GEN = GenerationConfig()
DEFAULT_MC_NUM = 128


def preset_for(task: str) -> Preset:
    if task in PRESETS:
        return PRESETS[task]
    for prefix, p in PRESETS.items():  # mmlu_abstract_algebra -> mmlu, minerva_math_algebra -> minerva_math
        if task.startswith(prefix + "_"):
            return p
    return Preset(num_fewshot=None)


def resolve_settings(task: str, num_fewshot=None, steps=None, gen_length=None, block_length=None, mc_num=None,
                     chat=None, seed: int = 0, fast: dict | None = None) -> tuple[int | None, GenerationConfig, int, bool | None]:
    """Preset values, each overridden by an explicit option. -> (shots, generation config, mc_num, chat)."""
    p = preset_for(task)
    gen_length = gen_length or p.gen_length or DEFAULT_GEN.gen_length
    block_length = block_length or p.block_length or min(DEFAULT_GEN.block_length, gen_length)
    steps = steps or p.steps or gen_length
    gcfg = GenerationConfig(steps=steps, gen_length=gen_length, block_length=block_length, seed=seed, **(fast or {}))
    shots = num_fewshot if num_fewshot is not None else p.num_fewshot
    return shots, gcfg, int(mc_num or p.mc_num or DEFAULT_MC_NUM), (chat if chat is not None else p.chat)


@register_model("dllmq")
class DLLMQLM(LM):
    """lm-eval LM for diffusion LMs and dllmq checkpoints (full precision or quantized)."""

    def __init__(self, pretrained: str = "tiny", device: str = "cpu", dtype: str = "bfloat16", mc_num: int = 128,
                 batch_size: int | str = 16, steps: int = 64, gen_length: int = 64, block_length: int = 32,
                 seed: int = 0, add_bos: bool = False, check_greedy: bool = True,
                 evaluator: DiffusionEvaluator | None = None, **unused):
        super().__init__()
        made_by_lm_eval = evaluator is None  # lm-eval's CLI (model_args), not `dllmq eval`
        if evaluator is None:
            from ..models.loading import load_tokenizer
            from ..runtime.loader import load

            device = str(device or "cpu")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device == "cpu" and torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            if device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's own CLI passes --device cuda by default; run where we can rather than fail
                import logging

                logging.getLogger(__name__).warning("CUDA is not available; evaluating on the CPU")
                device = "cpu"
            torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[str(dtype)]
            model = load(str(pretrained), device=device, dtype=torch_dtype)
            tok = load_tokenizer(model.source_path)
            bs = 16 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
            gcfg = GenerationConfig(steps=int(steps), gen_length=int(gen_length), block_length=int(block_length),
                                    seed=int(seed))
            evaluator = DiffusionEvaluator(model, tok, EngineConfig(gcfg, int(mc_num), bs, int(seed), bool(add_bos),
                                                                    bool(check_greedy)))
        self.ev = evaluator
        self._setup_data_parallel()
        self.on_batch = None  # extra progress callback (number of requests done, possibly fractional)
        # progress per request (dllmq.ui): a line on the active display (`dllmq eval`), or, when lm-eval's own
        # CLI made this class (`dllmq-lm-eval`), a display of its own on stderr (a terminal, rank 0 only)
        self.progress_label: str | None = None
        self.show_progress = made_by_lm_eval

    @contextlib.contextmanager
    def _progress(self, kind: str, n: int):
        from ..ui import bar

        label = self.progress_label or "lm-eval"
        with bar(label, total=n, info=f"{kind}: {n} requests", keep=False,
                 show=self.show_progress and self.rank == 0) as b:
            def tick(k: float) -> None:
                b.advance(k)
                if self.on_batch:
                    self.on_batch(k)
            yield tick if (b or self.on_batch) else None

    @classmethod
    def from_evaluator(cls, evaluator: DiffusionEvaluator) -> "DLLMQLM":
        return cls(evaluator=evaluator)

    # -- data parallel through accelerate (`accelerate launch -m dllmq.evaluation.lm_eval_cli --model dllmq ...`): lm-eval gives each
    # rank its share of the documents and gathers the results itself; it needs rank, world_size and the
    # collectives below.
    def _setup_data_parallel(self) -> None:
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes

    def all_gather(self, tensor):
        return self.accelerator.gather(tensor) if self.accelerator else tensor

    def gather_object(self, obj, dst=0):
        if not self.accelerator:
            return obj
        from accelerate.utils import gather_object

        return gather_object(obj)

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    # -- the three request types
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        with self._progress("loglikelihood", len(requests)) as tick:
            return self.ev.loglikelihood([tuple(r.args[:2]) for r in requests], on_batch=tick)

    def loglikelihood_rolling(self, requests) -> list[float]:
        with self._progress("loglikelihood_rolling", len(requests)) as tick:
            return self.ev.loglikelihood_rolling([r.args[0] for r in requests], on_batch=tick)

    def generate_until(self, requests) -> list[str]:
        contexts, until = [], []
        for r in requests:
            ctx, kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
            stops = kwargs.get("until") or []
            contexts.append(ctx)
            until.append([stops] if isinstance(stops, str) else list(stops))
        with self._progress("generate_until", len(requests)) as tick:
            return self.ev.generate(contexts, until, on_batch=tick)

    # -- chat templates (lm-eval's --apply_chat_template)
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.ev.chat_prompt(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.ev.tok, "name_or_path", "dllmq")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.ev.tok.chat_template if chat_template else None


# ---------------------------------------------------------------------------------------------- tiny tasks
def _tiny_math_results(doc, results):
    from .task_data import extract_answer

    return {"exact_match": float(extract_answer(results[0]) == doc["answer"])}


def _tiny_code_results(doc, results):
    from .execution import check_function
    from .task_data import code_completion

    ok, _ = check_function(code_completion(doc["prompt"], results[0]), doc["test"], doc["entry_point"])
    return {"pass@1": float(ok)}


def tiny_task_config(name: str) -> dict:
    """The bundled task `name` as an lm-eval task config over its local jsonl file."""
    from .task_data import TASK_DIR

    base = {"task": name, "dataset_path": "json", "test_split": "train",
            "dataset_kwargs": {"data_files": {"train": str(TASK_DIR / f"{name}.jsonl")}},
            "metadata": {"version": 1.0}}
    if name == "tiny-math":
        return {**base, "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n\n\n"]}, "process_results": _tiny_math_results,
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    if name == "tiny-code":
        return {**base, "output_type": "generate_until", "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{canonical_solution}}", "unsafe_code": True,
                "generation_kwargs": {"until": ["\n\n\n"]}, "process_results": _tiny_code_results,
                "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}]}
    if name == "tiny-mc":
        return {**base, "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    raise UserError(f"unknown bundled task {name!r}; available: tiny-math, tiny-code, tiny-mc")


TINY_TASKS = ("tiny-math", "tiny-code", "tiny-mc")
_SHIM = "dllmq_tiny_tasks"  # the module the YAML files' `!function` tags name (next to them, as lm-eval wants)


@functools.cache
def tiny_task_dir() -> str:
    """A folder of lm-eval YAML task files for the bundled tasks (the same configs as :func:`tiny_task_config`,
    data from the installed package), for lm-eval's own CLI: `dllmq-lm-eval --tasks tiny-mc` adds it to every
    TaskManager's include path. Written once per process to a temporary folder, removed at exit."""
    import atexit
    import shutil
    import tempfile

    import yaml

    d = Path(tempfile.mkdtemp(prefix="dllmq-lm-eval-tasks-"))
    atexit.register(shutil.rmtree, d, True)
    (d / f"{_SHIM}.py").write_text(
        "# generated by dllmq: the bundled tasks' scoring functions, for lm-eval's `!function` tags\n"
        "from dllmq.evaluation.harness import _tiny_code_results, _tiny_math_results  # noqa: F401\n")
    for name in TINY_TASKS:
        cfg = tiny_task_config(name)
        funcs = {k: v for k, v in cfg.items() if callable(v)}
        plain = {k: v for k, v in cfg.items() if k not in funcs}
        text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
        text += "".join(f"{k}: !function {_SHIM}.{f.__name__}\n" for k, f in funcs.items())
        (d / f"{name}.yaml").write_text(text)
    return str(d)


def include_tiny_tasks() -> None:
    """Make every lm-eval TaskManager also index the bundled tasks (:func:`tiny_task_dir`), whatever include
    path the user gave (lm-eval's CLI takes a single --include_path). Idempotent."""
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__
    if getattr(init, "_dllmq_tiny", False):
        return
    sig = inspect.signature(init)

    @functools.wraps(init)
    def patched(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        inc = bound.arguments.get("include_path")
        paths = [] if inc is None else list(inc) if isinstance(inc, (list, tuple)) else [inc]
        if tiny_task_dir() not in map(str, paths):
            paths.append(tiny_task_dir())
        bound.arguments["include_path"] = paths
        init(*bound.args, **bound.kwargs)

    patched._dllmq_tiny = True
    TaskManager.__init__ = patched


# ---------------------------------------------------------------------------------------------- running
@dataclass
class HarnessRun:
    task: str
    metric: str
    value: float
    stderr: float
    n: int
    seconds: float
    samples: list
    settings: dict


_PRIMARY = ("exact_match", "pass@1", "acc_norm", "acc", "f1", "word_perplexity", "bleu")


def _primary_metric(res: dict) -> str:
    keys = [k for k in res if "," in k and not k.split(",")[0].endswith("_stderr")]
    for m in _PRIMARY:
        for k in keys:
            if k.split(",")[0] == m and (k.endswith(",none") or k.endswith(",strict-match") or
                                         k.endswith(",flexible-extract") or k.endswith(",create_test")):
                return k
    if not keys:
        raise UserError("lm-eval returned no metric")
    return keys[0]


def _unreachable(task: str, err: Exception, tm) -> UserError:
    path, name = "?", None
    try:
        entry = tm.task_index.get(task)
        cfg = getattr(entry, "cfg", None) or {}
        path, name = cfg.get("dataset_path", "?"), cfg.get("dataset_name")
    except Exception:  # noqa: BLE001 - the message below is still useful without the name
        pass
    ds = f"{path}" + (f" ({name})" if name else "")
    fetch = f"datasets.load_dataset('{path}'" + (f", '{name}'" if name else "") + ")"
    return UserError(f"task {task}: its dataset {ds} is not reachable (offline, and not in the local datasets cache); "
                     f"on a connected machine run python -c \"import datasets; {fetch}\" and copy "
                     f"~/.cache/huggingface to this one ({type(err).__name__})")


def _quiet_git_hash() -> str | None:
    """lm-eval records `git describe` of the working folder; its version lets git's "fatal: not a git
    repository" reach the user's terminal. Same result, stderr silenced."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@functools.cache  # patch once per process
def _quiet_lm_eval() -> None:
    """Our rich bar covers a run: silence lm-eval's git probe and its per-task "building contexts" bar."""
    import lm_eval.api.task as lm_task
    import lm_eval.evaluator as lm_evaluator
    from tqdm import tqdm

    lm_evaluator.get_git_commit_hash = _quiet_git_hash
    lm_task.tqdm = functools.partial(tqdm, disable=True)


def run_harness_task(lm: DLLMQLM, task: str, num_fewshot=None, steps=None, gen_length=None, block_length=None,
                     mc_num=None, chat=None, limit=None, allow_exec: bool = False, seed: int = 0,
                     task_manager=None, fast: dict | None = None) -> HarnessRun:
    """Evaluate one lm-eval task (a registered name or a bundled tiny task) with its preset."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import datasets

    for noisy in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_lm_eval()
    datasets.disable_progress_bars()  # our own bar covers the run
    shots, gcfg, mc, use_chat = resolve_settings(task, num_fewshot, steps, gen_length, block_length, mc_num, chat, seed,
                                                 fast)
    ev = lm.ev
    if use_chat is None:
        use_chat = bool(ev.tok.chat_template)
    spec = tiny_task_config(task) if task.startswith("tiny-") else task
    tm = task_manager or TaskManager()
    if isinstance(spec, str) and not tm.match_tasks([spec]):
        raise UserError(f"unknown task {task!r}: not a bundled task (tiny-math, tiny-code, tiny-mc) nor an lm-eval "
                        f"task; list them with `lm-eval ls tasks`")
    saved = (ev.config.generation, ev.config.mc_num, ev.config.seed, lm.progress_label)
    ev.config.generation, ev.config.mc_num, ev.config.seed = gcfg, mc, seed
    lm.progress_label = task
    t0 = time.time()
    try:
        out = simple_evaluate(model=lm, tasks=[spec], num_fewshot=shots, limit=limit, task_manager=tm,
                              apply_chat_template=bool(use_chat), confirm_run_unsafe_code=allow_exec,
                              log_samples=True, bootstrap_iters=0 if task.startswith("tiny-") else 1000,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, verbosity="ERROR")
    except (ConnectionError, FileNotFoundError, OSError) as e:
        if isinstance(spec, dict):
            raise
        raise _unreachable(task, e, tm) from None
    except Exception as e:  # datasets raises its own hierarchy for "not cached and offline"
        if type(e).__name__ in ("DatasetNotFoundError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                                "HfHubHTTPError") and isinstance(spec, str):
            raise _unreachable(task, e, tm) from None
        raise
    finally:
        ev.config.generation, ev.config.mc_num, ev.config.seed, lm.progress_label = saved
    seconds = time.time() - t0
    if out is None:  # non-zero ranks under data parallel
        return HarnessRun(task, "", 0.0, 0.0, 0, seconds, [], {})
    name = next(iter(out["results"]))
    res = out["results"][name]
    key = _primary_metric(res)
    metric, filt = key.split(",", 1)
    stderr = res.get(f"{metric}_stderr,{filt}", 0.0)
    stderr = float(stderr) if isinstance(stderr, (int, float)) else 0.0
    samples = [_sample(s, metric) for s in out.get("samples", {}).get(name, [])]
    n = int(out.get("n-samples", {}).get(name, {}).get("effective", len(samples)))
    settings = {"num_fewshot": shots, "generation": gcfg.to_dict(), "mc_num": mc, "chat": bool(use_chat),
                "lm_eval_version": out.get("config", {}).get("lm_eval_version") or _lm_eval_version(),
                "lm_eval": lm_eval_raw(out)}
    if allow_exec:  # what the code sandbox actually got on this machine, next to the scores it produced
        from . import execution

        settings["code_sandbox"] = dict(execution.SANDBOX)
    return HarnessRun(task, metric, float(res[key]), stderr, n, seconds, samples, settings)


_RAW_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
             "config", "date", "lm_eval_version", "transformers_version")


def lm_eval_raw(out: dict) -> dict:
    """The parts of simple_evaluate's result that lm-eval writes to its results file (not the samples, nor the
    environment dump), JSON-safe: what `dllmq eval --output-format lm-eval` writes (lm_eval_schema.py)."""
    def safe(o):
        if callable(o):
            return f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', repr(o))}"
        return str(o)

    import json

    return json.loads(json.dumps({k: out[k] for k in _RAW_KEYS if k in out}, default=safe))


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _sample(s: dict, metric: str) -> dict:
    doc = s.get("doc", {})
    resp = s.get("filtered_resps") or s.get("resps")
    out = {"doc_id": s.get("doc_id"), "target": s.get("target"), metric: s.get(metric)}
    if isinstance(resp, list) and resp and isinstance(resp[0], str):
        out["output"] = resp[0]
    elif isinstance(resp, list):
        out["loglik"] = [r[0] if isinstance(r, (list, tuple)) else r for r in resp]
    for k in ("question", "task_id", "id"):
        if k in doc:
            out[k] = doc[k]
    return out
