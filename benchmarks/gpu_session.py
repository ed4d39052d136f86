"""Move a trained model through the device tool's file limits (at most 8 files of 16 MiB each come back).

    python benchmarks/gpu_session.py split MODEL_DIR OUT_DIR      # on the GPU machine: 3 balanced shards + logs
    python benchmarks/gpu_session.py assemble OUT_DIR MODEL_DIR   # here: shards + index + config + tokenizer
    python benchmarks/gpu_session.py shard MODEL_DIR              # model.safetensors -> shards + index, in place

The bundled model is stored as shards of ~11 MiB: the repository takes no file over 25 MB.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

SHARDS = 3
LOGS = ("training.json", "training_log.csv")


def split(model_dir: Path, out: Path) -> None:
    state = load_file(str(model_dir / "model.safetensors"))
    shards, sizes = [{} for _ in range(SHARDS)], [0] * SHARDS
    for k in sorted(state, key=lambda k: -state[k].numel()):  # largest first onto the lightest shard
        i = sizes.index(min(sizes))
        shards[i][k] = state[k]
        sizes[i] += state[k].numel() * state[k].element_size()
    out.mkdir(parents=True, exist_ok=True)
    for i, sh in enumerate(shards):
        save_file(sh, str(out / f"model-{i}.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model_dir / "config.json").read_text())
    info = json.loads((model_dir / "training.json").read_text())
    info["config"] = cfg  # config.json rides inside training.json: one file fewer against the limit
    (out / "training.json").write_text(json.dumps(info, indent=2))
    shutil.copy(model_dir / "training_log.csv", out / "training_log.csv")


def assemble(out: Path, model_dir: Path) -> None:
    from dllmq.models.loading import BUNDLED_DIR

    model_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for f in sorted(out.glob("model-*.safetensors")):
        state.update(load_file(str(f)))
    from dllmq.models.tiny import write_sharded

    write_sharded(state, model_dir, shards=3)
    info = json.loads((out / "training.json").read_text())
    cfg = info.pop("config")
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (model_dir / "training.json").write_text(json.dumps(info, indent=2))
    shutil.copy(out / "training_log.csv", model_dir / "training_log.csv")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # the reused tokenizer
        shutil.copy(BUNDLED_DIR / "tiny-llada" / name, model_dir / name)


def shard(model_dir: Path) -> None:
    from dllmq.models.tiny import write_sharded

    single = model_dir / "model.safetensors"
    write_sharded(load_file(str(single)), model_dir, shards=3)
    single.unlink()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "shard":
        shard(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] in ("split", "assemble"):
        {"split": split, "assemble": assemble}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
