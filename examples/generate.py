"""Generate text with a quantized checkpoint (or the full-precision bundled model).

    python examples/generate.py [--checkpoint out/tiny-recipe] [--fast]

Without --checkpoint the bundled `tiny` model is quantized (RTN W4, a few seconds) into a temporary folder.
"""

import argparse
import tempfile

import dllmq

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--checkpoint", help="a dllmq checkpoint folder, a model folder or 'tiny'")
ap.add_argument("--fast", action="store_true", help="dual KV cache + confidence threshold 0.9")
args = ap.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    path = args.checkpoint
    if path is None:
        path = dllmq.quantize("tiny", {"method": "rtn", "weights": {"bits": 4, "group_size": 32}},
                              out=f"{tmp}/tiny-w4").out
    model = dllmq.load(path)  # the checkpoint's tokenizer and chat template come with it
    fast = {"cache": "dual", "threshold": 0.9} if args.fast else {}

    one = model.generate("What is 12 + 30?", gen_length=32, steps=32, block_length=32, **fast)  # -> str
    print(f"> What is 12 + 30?\n{one}")
    prompts = ["Name a colour.", "What is the capital of France?"]
    for p, text in zip(prompts, model.generate(prompts, gen_length=32, steps=16, block_length=16, **fast)):
        print(f"> {p}\n{text}")  # a list of prompts -> a list of texts, generated as one batch
