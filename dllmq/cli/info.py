"""`dllmq info`: what a checkpoint (or a full-precision model) holds, its settings, and the recipe that reproduces it."""

from __future__ import annotations

import json
import sys

import typer

from ..errors import UserError
from ..ui import fitted_console, human_bytes, layer_table, table
from .options import JsonOpt, VerboseOpt, _emit_json


def info(checkpoint: str = typer.Argument(..., help="A dllmq checkpoint folder (or a full-precision model)."),
         verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file of a dllmq checkpoint against the sha256 in its manifest (reads every byte once)."),
         show_recipe: bool = typer.Option(False, "--recipe", help="Print the recipe this checkpoint was made with, as a file that reproduces the run (YAML; JSON with --json)."),
         verbose: bool = VerboseOpt,
         json_out: bool = JsonOpt):
    """Show a checkpoint's method, specs, sizes and per-layer summary.

    Example: [bold]dllmq info ./llada-w4[/bold]   (or [bold]dllmq info ./llada-w4 --recipe > recipe.yaml[/bold])
    """
    if show_recipe:
        from ..recipe import recipe_of

        rec = recipe_of(checkpoint)
        sys.stdout.write(rec.to_json() if json_out else rec.to_yaml())
        return
    from ..checkpoint.format import MANIFEST, QuantizationConfig
    from ..checkpoint.writer import verify_manifest
    from ..models.loading import parse, read_config, resolve_model_path

    p = resolve_model_path(checkpoint)
    raw = read_config(p)
    arch, cfg = parse(p)
    files = {f.name: f.stat().st_size for f in p.iterdir() if f.is_file()}
    weights_bytes = sum(v for k, v in files.items() if k.endswith(".safetensors"))
    data = {"path": str(p), "family": arch.family, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "weights_bytes": weights_bytes, "quantized": "quantization_config" in raw}
    per_layer = []
    if data["quantized"]:
        q = QuantizationConfig.from_dict(raw["quantization_config"])
        data.update(method=q.method, weights=q.weights.to_dict(), activations=q.activations.to_dict(),
                    kv_cache=q.kv_cache.to_dict(), method_options=q.method_args,
                    online_transforms=len(q.transforms), ignore=q.ignore, quantized_layers=len(q.quantized_layers))
        mf = p / MANIFEST
        if not mf.exists():
            data["verified"] = f"no: {MANIFEST} is missing (not written by dllmq, or incomplete)"
        else:
            if verify:
                m = verify_manifest(p)  # one-line UserError on any mismatch or malformed manifest
                from ..checkpoint.structure import check_folder

                check_folder(p, raw)  # every layer the config describes, with its shapes and dtypes
                data["verified"] = (f"yes: sha256 of {len(m['files'])} files match {MANIFEST}; every layer has the "
                                    "shapes and dtypes its config describes")
            else:
                try:
                    m = json.loads(mf.read_text())
                except (ValueError, OSError):
                    raise UserError(f"{mf} is corrupt; re-create the checkpoint") from None
                if not isinstance(m, dict):
                    raise UserError(f"{mf} is malformed (not a JSON object); re-create the checkpoint")
                data["verified"] = "no (--no-verify): files not checked against the manifest"
            data.update(base_model=m.get("base_model"), command=m.get("command"), created=m.get("created"),
                        tool_version=m.get("tool_version"), calibration=m.get("calibration"))
            per_layer = m.get("layers", []) if isinstance(m.get("layers"), list) else []
    if json_out:
        _emit_json({**data, "per_layer": per_layer})
        return
    con = fitted_console()  # piped: the terminal's width (or 100 columns), not rich's 80 or a fixed 200
    table(f"{p}", ["field", "value"], _info_rows(data, q if data["quantized"] else None), console=con,
          justify="left")
    if per_layer:
        layer_table("Per layer (error relative to full precision)", per_layer, verbose, console=con)


def _info_rows(data: dict, q) -> list[list]:
    """`dllmq info` fields for people: human sizes and specs in words (--json keeps the raw values)."""
    def compact(v):
        if isinstance(v, dict):
            return ", ".join(f"{k}={compact(x)}" for k, x in v.items()) or "-"
        if isinstance(v, list):
            return ", ".join(map(str, v)) or "-"
        return "-" if v is None else v

    def per_token(spec, what: str) -> str:
        if not spec.enabled:
            return "not quantized"
        clip = f", clip {spec.clip_ratio:g}" if spec.clip_ratio < 1 else ""
        return f"int{spec.num_bits} {'sym' if spec.symmetric else 'asym'} dynamic per {what}{clip}"

    names = {"layers": "transformer blocks", "kv_cache": "K/V cache", "hidden_size": "hidden size", "vocab_size": "vocabulary", "weights_bytes": "weights on disk",
             "method_options": "method options", "online_transforms": "online transforms",
             "quantized_layers": "quantized layers", "base_model": "base model", "tool_version": "dllmq version"}
    rows = []
    for k, v in data.items():
        if k == "weights_bytes":
            v = human_bytes(v)
        elif k == "quantized":
            v = "yes" if v else "no (full precision)"
        elif q is not None and k == "weights":
            v = q.weights.describe()
        elif q is not None and k == "activations":
            v = per_token(q.activations, "token")
        elif q is not None and k == "kv_cache":
            v = per_token(q.kv_cache, "token and head") + (", q/k rotated" if q.kv_cache.rotate_qk else "")
        rows.append([names.get(k, k), compact(v)])
    return rows
