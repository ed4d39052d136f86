"""dllmq: post-training quantization for diffusion language models (LLaDA, Dream).

    import dllmq
    res = dllmq.quantize("tiny", "recipe.yaml", out="./tiny-w4")       # a Recipe, a dict or a YAML/JSON file
    model = dllmq.load("./tiny-w4")      # quantized or full-precision folder, Hub id, or "tiny"
    print(model.generate("What is 12 + 30?", gen_length=32, steps=32))
"""

from ._version import __version__  # noqa: F401

from .recipe import (  # noqa: E402  (no torch: `import dllmq` stays cheap)
    ActivationsRecipe, CalibrationRecipe, Recipe, TMASRecipe, WeightsRecipe, recipe_of,
)


def load(path=None, device="cpu", dtype=None, verify: bool = True, **kw):
    """Load a dllmq checkpoint (real quantized linears) or a full-precision model folder / Hub id.

    The model (a torch module) has `generate(prompt | [prompts], gen_length=, steps=, block_length=,
    temperature=, cache=, threshold=) -> str | list[str]`, with the checkpoint's tokenizer and chat template."""
    from .runtime.loader import load as _load

    return _load(path, device=device, dtype=dtype, verify=verify, **kw)


def quantize(model, recipe=None, out=None, **kw):
    """Quantize MODEL with RECIPE (a `Recipe`, a dict, or a YAML/JSON file path) into OUT; keyword arguments
    override recipe fields (method="gptq", weights={"bits": 8}, calibration__samples=8) or set how it runs
    (overwrite, device, revision, offload_dir, resume, show_progress). Returns a QuantizeResult whose
    `.recipe` is the resolved recipe the checkpoint records. See dllmq.recipe.quantize."""
    from .recipe import quantize as _quantize

    return _quantize(model, recipe, out, **kw)


__all__ = ["load", "quantize", "Recipe", "WeightsRecipe", "ActivationsRecipe", "CalibrationRecipe", "TMASRecipe",
           "recipe_of", "__version__"]
