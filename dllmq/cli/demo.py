"""`dllmq demo`: quantize the bundled model and compare it with full precision on its tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..ui import table
from .evaluate import print_comparison, strip_samples
from .options import JsonOpt, _emit_json


def demo(
    out: Path = typer.Option(Path("out/tiny-w4a16-rtn"), "--out", "-o", help="Where to write the quantized demo checkpoint."),
    method: str = typer.Option("rtn", "--method", "-m", help="Method for the demo: rtn, gptq or awq."),
    w: int = typer.Option(4, "--w", help="Weight bits."),
    group_size: int = typer.Option(32, "--group-size", "-g", help="Group size."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Examples per task (default: all)."),
    json_out: bool = JsonOpt,
):
    """Quantize the bundled model and compare it with full precision: task suite, NLL, agreement, size, time.

    Example: [bold]dllmq demo --method gptq --w 4[/bold]
    """
    from ..checkpoint.format import QuantizationConfig
    from ..diffusion.generation import GenerationConfig
    from ..evaluation.report import compare_models, compare_tasks, task_table_rows
    from ..evaluation.tasks import TASKS
    from ..models.loading import read_config, resolve_model_path
    from ..models.registry import arch_for
    from ..pipeline import CalibOptions
    from ..pipeline import quantize as run
    from ..quantization.methods import get_method
    from ..quantization.spec import WeightSpec

    get_method(method)
    arch = arch_for(read_config(resolve_model_path("tiny")))
    qcfg = QuantizationConfig(method=method, weights=WeightSpec(num_bits=w, group_size=group_size),
                              ignore=arch.default_ignore())
    res_q = run("tiny", qcfg, out, overwrite=True, calib=CalibOptions(),
                command=f"dllmq demo --method {method} --w {w} --group-size {group_size}", show_progress=not json_out)
    tasks = compare_tasks(str(out), list(TASKS), against="tiny", gcfg=GenerationConfig(), limit=limit,
                          allow_exec=True, show_progress=not json_out)
    quality = compare_models(str(out), against="tiny", show_progress=not json_out)
    if json_out:
        _emit_json({"quantize_seconds": res_q.seconds, "tasks": strip_samples(tasks), "quality": quality})
        return
    cols, rows = task_table_rows(tasks)
    table(f"Bundled model: full precision vs {method.upper()} W{w} g{group_size} (accuracy %, ± standard error)",
          cols, rows)
    print_comparison(quality)
