"""What `dllmq push CHECKPOINT owner/name --dry-run` does: validate the checkpoint, build the model card and
the list of files, upload nothing (no token needed, no network).

    python examples/push_dry_run.py [--checkpoint out/tiny-recipe] [--repo-id my-user/tiny-w4]

Without --checkpoint the bundled `tiny` model is quantized (RTN W4) into a temporary folder.
"""

import argparse
import tempfile

import dllmq
from dllmq.hub.push import plan_push

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--checkpoint")
ap.add_argument("--repo-id", default="my-user/tiny-llada-w4-rtn")
args = ap.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    ckpt = args.checkpoint or dllmq.quantize("tiny", {"method": "rtn", "weights": {"group_size": 32}},
                                             out=f"{tmp}/tiny-w4").out
    plan = plan_push(ckpt, args.repo_id)  # sha256 check of every file, the card, the upload list
    s = plan.summary()
    print(f"would upload {len(s['files'])} files ({s['bytes']} bytes) to {s['repo_id']} @ {s['revision']}")
    for f in s["files"]:
        print(f"  {f['path']}  {f['bytes']}")
    header = plan.card.split("---\n")[1] if plan.card.startswith("---\n") else ""
    print("model card header:\n---\n" + header + "---")
