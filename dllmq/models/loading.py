"""Find, validate and load a full-precision dLLM from a folder or a Hub id, without remote code.

Weights are read from safetensors only (never pickles). Tokenizers are read from tokenizer.json
with PreTrainedTokenizerFast, which ignores config.json's `auto_map`: no remote code runs and no
trust prompt appears.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from .base import ArchSpec, DiffusionLM, DLLMConfig
from .registry import arch_for
from .tokenizer_loading import load_tokenizer  # noqa: F401  (re-exported: most callers import it from here)

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
BUNDLED_MODELS = {"tiny": BUNDLED_DIR / "tiny-llada"}
# what a Hub download fetches: configs, safetensors shards, tokenizer files, never code or pickles
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md"]


def resolve_model_path(name_or_path: str | os.PathLike | None, revision: str | None = None) -> Path:
    """A local folder, a bundled model name ('tiny', the default; 'tiny-outliers'), or a Hub repo id."""
    name = str(name_or_path) if name_or_path not in (None, "") else "tiny"
    if name == "tiny-outliers":
        # the bundled model with function-preserving injected outliers, built once into the cache
        import hashlib

        from .variants import cache_dir

        base = resolve_model_path("tiny")
        # keyed on the bundled weights, so a retrained bundled model never meets a stale variant
        h = hashlib.sha256()
        for f in sorted(base.glob("*.safetensors")):  # one file or shards
            h.update(f.read_bytes())
        digest = h.hexdigest()[:12]
        out = cache_dir() / f"tiny-outliers-{digest}"
        if not (out / "config.json").exists():
            outlier_variant(base, out)
        return out
    if name in BUNDLED_MODELS:
        path = BUNDLED_MODELS[name]
        if not (path / "config.json").exists():
            raise UserError(f"the bundled model {name!r} is missing from this install ({path}); reinstall dllmq")
        return path
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p} is a file; pass the model folder that holds config.json")
        return p
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model {name!r} not found: pass a local folder, a Hub id like GSAI-ML/LLaDA-8B-Instruct, or 'tiny'")
    return _download(name, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise UserError(
            f"cannot download {repo_id!r}: offline and not in the Hugging Face cache; "
            "connect to the Hub once or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} not found (or private: set HF_TOKEN or run `hf auth login`)") from None
    except Exception as e:  # network errors come in many types
        raise UserError(f"cannot download {repo_id!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise UserError(f"{path} has no config.json; pass a model folder")
    if not f.is_file():
        raise UserError(f"{f} is not a file; pass a model folder with a config.json file")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{f} is not UTF-8 text; fix or re-download config.json") from None
    except OSError as e:
        raise UserError(f"cannot read {f}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{f} must hold a JSON object, got a {type(raw).__name__}; fix or re-download config.json")
    return raw


def parse(path: Path) -> tuple[ArchSpec, DLLMConfig]:
    raw = read_config(path)
    arch = arch_for(raw)
    try:
        return arch, arch.parse_config(raw)
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError, OverflowError) as e:
        # e.g. "rope_theta": "fast", "mask_token_id": [1], "mlp_ratio": "4"
        raise UserError(f"{path / 'config.json'} has a value of the wrong type ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else e!r}); fix or re-download config.json") from None


def weight_map(path: Path) -> dict[str, str]:
    """tensor name -> shard file name, from model.safetensors.index.json or a single file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{index} is corrupt (no weight_map); re-download or re-export the model") from None
        for shard in set(wm.values()):
            if not (path / shard).exists():
                raise UserError(f"shard {shard} listed in {index.name} is missing from {path}")
        return wm
    single = path / "model.safetensors"
    if single.exists():
        return {k: single.name for k in _keys(single)}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise UserError(f"{path} has only pickle weights (.bin/.pt); dllmq reads safetensors only, convert them first")
    raise UserError(f"{path} has no safetensors weights (model.safetensors or model.safetensors.index.json)")


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e}); re-download it") from None


class ShardReader:
    """Reads named tensors lazily from the shards, so a model never needs to fit in memory twice."""

    def __init__(self, path: Path):
        self.path = path
        self.map = weight_map(path)
        self._open: dict[str, object] = {}

    def _handle(self, shard: str):
        if shard not in self._open:
            try:
                self._open[shard] = safe_open(self.path / shard, "pt")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{self.path / shard} is not a readable safetensors file ({e})") from None
        return self._open[shard]

    def close(self) -> None:
        """Drop the open (memory-mapped) shards so pages already read stop counting as resident."""
        self._open.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.map:
            raise UserError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        try:
            return self._handle(self.map[name]).get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"cannot read {name!r} from {self.map[name]} ({e}); the file is corrupt") from None

    def names(self, prefix: str = "") -> list[str]:
        return [k for k in self.map if k.startswith(prefix)]


_INIT_FNS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def _skip_weight_init():
    """Module constructors initialise their weights; on meta tensors that is pure waste, and torch routes
    meta ``normal_`` through its Python reference, which imports torch._dynamo (seconds on a small CPU)."""
    saved = {n: getattr(torch.nn.init, n) for n in _INIT_FNS}
    try:
        for n in _INIT_FNS:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def build_empty(arch: ArchSpec, config: DLLMConfig) -> DiffusionLM:
    """The module tree with no storage allocated (meta device); loaders fill it tensor by tensor."""
    with torch.device("meta"), _skip_weight_init():
        return arch.build(config)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    revision: str | None = None,
) -> DiffusionLM:
    """Load a full-precision LLaDA/Dream model with our native implementation."""
    path = resolve_model_path(name_or_path, revision)
    arch, config = parse(path)
    if (path / "config.json").exists() and "quantization_config" in read_config(path):
        raise UserError(f"{path} is a quantized checkpoint; load it with dllmq.load()")
    model = build_empty(arch, config)
    reader = ShardReader(path)
    state = {}
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(reader.map))
    if missing:
        raise UserError(
            f"checkpoint in {path} lacks {len(missing)} tensors expected for {arch.family} "
            f"(first: {missing[0]}); is config.json from the same model?"
        )
    for name in expected:
        t = reader.get(name)
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise UserError(f"tensor {name} has shape {tuple(t.shape)} but config.json implies {tuple(want)}")
        state[name] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.name_or_path = str(name_or_path or "tiny")
    model.source_path = path
    return model.eval()


def outlier_variant(src: Path, out: Path, **kw) -> Path:
    """`src` with function-preserving injected activation outliers (models/variants.py), written to `out`."""
    from .variants import write_outlier_variant

    return write_outlier_variant(load_model(src, dtype=torch.float32), src, out, **kw)
