"""Quantize the bundled `tiny` model with a recipe file, then print the recipe the checkpoint records.

    python examples/quantize_with_recipe.py [--recipe examples/recipe.yaml] [--out out/tiny-recipe]

The same recipe from the command line writes identical tensors:
    dllmq quantize tiny --recipe examples/recipe.yaml --out out/tiny-recipe-cli
"""

import argparse
from pathlib import Path

import dllmq

HERE = Path(__file__).resolve().parent

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default="tiny")
ap.add_argument("--recipe", default=str(HERE / "recipe.yaml"))
ap.add_argument("--out", default="out/tiny-recipe")
args = ap.parse_args()

# keyword arguments override recipe fields: dllmq.quantize(..., weights={"bits": 8}, calibration__samples=8)
res = dllmq.quantize(args.model, args.recipe, out=args.out, overwrite=True)
err = sum(r.rel_error for r in res.layers) / len(res.layers)
print(f"wrote {res.out}: {len(res.layers)} layers, mean relative error {err:.4f}, {res.seconds:.1f} s")

# the checkpoint records the resolved recipe (method defaults filled in); this YAML reproduces the run
print("recorded recipe:")
print(dllmq.recipe_of(res.out).to_yaml())
