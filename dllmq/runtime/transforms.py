"""Online input transforms: what a weight-activation method must apply to a linear's input at
inference (after folding the inverse into the weight offline).

Recorded in `quantization_config.transforms[<layer>]` as a small dict; tensors (if any) are
stored in the shards as `<layer>.input_transform.<name>`:
  {"type": "hadamard", "size": n}          x -> x @ H_n^T / sqrt(n)           (QuaRot, FFN down input)
  {"type": "hadamard_heads", "heads": h,    x -> (H_h / sqrt(h) (x) I_d) x      (QuaRot, attention output
   "head_dim": d}                           i.e. a Hadamard across heads          projection input: with the
                                                                                 per-head H_d folded offline
                                                                                 it makes the full H_{h*d})
  {"type": "duquant"}                       x -> (x / s) @ R1 P R2             (DuQuant; tensors smooth_scale,
                                                                                 rot1, perm, rot2)
  {"type": "scale"}                         x -> x / s                         (SmoothQuant where no fold is
                                                                                 possible; tensor smooth_scale)
A DuQuant transform shared by several linears reading the same input (q/k/v; gate/up) is stored once,
on the first of them; the others record {"type": "duquant", "shared_with": <that layer's full name>}
and get the very same module, which computes the product once per forward for all its consumers.
The attention output projection's dict may also carry IA-AQ's {"v_clip": a, "v_bits": b} (the clip and bits
of the attention values, used by runtime/kv_quant.py), or, in older checkpoints, {"act_clip": r}.

Every kind is a module class registered with `@register_transform` (its `kind`, `label` and `from_spec`): the
loader builds from the registry, and the model card and the compressed-tensors exporter name transforms through
`describe`. A method that brings a new kind of online transform registers one class; nothing else changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

TENSOR_PREFIX = "input_transform"

#: Online transforms by the "type" recorded in a checkpoint. Filled by `register_transform`.
TRANSFORMS: dict[str, type[nn.Module]] = {}

#: Per-layer settings a spec may carry besides (or instead of) a transform, by key: what they are called.
ANNOTATIONS = {"act_clip": "per-layer activation clipping (IA-AQ)", "v_clip": "per-layer value quantization (IA-AQ)"}


def register_transform(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: an online transform module with class attributes `kind` (the spec's "type") and
    `label` (how cards and errors name it), built by `cls.from_spec(spec, tensors)`."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_transform expects an nn.Module subclass, got {cls!r}")
    kind, label = getattr(cls, "kind", None), getattr(cls, "label", None)
    if not (isinstance(kind, str) and kind and isinstance(label, str) and label):
        raise TypeError(f"{cls.__name__} needs class attributes `kind` and `label`")
    if not callable(getattr(cls, "from_spec", None)):
        raise TypeError(f"{cls.__name__} needs a classmethod from_spec(spec, tensors)")
    if kind in TRANSFORMS and TRANSFORMS[kind] is not cls:
        raise ValueError(f"an online transform of type {kind!r} is already registered ({TRANSFORMS[kind].__name__})")
    TRANSFORMS[kind] = cls
    return cls


def describe(spec: dict) -> list[str]:
    """What a layer's spec asks for at run time, as labels (a transform and/or annotations)."""
    if not isinstance(spec, dict):
        return []
    kind = spec.get("type")
    out = []
    if kind:
        cls = TRANSFORMS.get(kind)
        out.append(cls.label if cls is not None else f"online {kind!r} transform")
    out += [label for key, label in ANNOTATIONS.items() if key in spec]
    return out


def summarize(specs) -> str:
    """What a set of layer specs asks for at run time, e.g. "online Hadamard rotations (QuaRot) on 2 layers"."""
    counts: dict[str, int] = {}
    for spec in specs:
        for label in describe(spec):
            counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{k} on {n} layer{'s' if n != 1 else ''}" for k, n in sorted(counts.items()))


@register_transform
class OnlineHadamard(nn.Module):
    kind, label = "hadamard", "online Hadamard rotations (QuaRot)"

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict) -> "OnlineHadamard":
        return cls(int(spec["size"]))

    def __init__(self, size: int):
        super().__init__()
        from ..quantization.hadamard import hadamard_factor

        hadamard_factor(size)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..quantization.hadamard import fast_hadamard_transform

        return fast_hadamard_transform(x)

    def extra_repr(self) -> str:
        return f"size={self.size}"


@register_transform
class OnlineHeadHadamard(nn.Module):
    """Hadamard across heads: [..., heads * head_dim] viewed as [..., heads, head_dim], H_heads on the
    heads axis. QuaRot's online half of the o_proj input rotation (the per-head half is offline)."""

    kind, label = "hadamard_heads", "online Hadamard rotations across heads (QuaRot)"

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict) -> "OnlineHeadHadamard":
        return cls(int(spec["heads"]), int(spec["head_dim"]))

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        from ..quantization.hadamard import hadamard_factor

        hadamard_factor(heads)
        self.heads, self.head_dim = heads, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..quantization.hadamard import fast_hadamard_transform

        shape = x.shape
        y = x.reshape(*shape[:-1], self.heads, self.head_dim).transpose(-1, -2)
        return fast_hadamard_transform(y).transpose(-1, -2).reshape(shape)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"


@register_transform
class OnlineDuQuant(nn.Module):
    """(x / s) R1 P R2. Installed on every linear that reads the same input (q/k/v share one): the
    product is computed once per forward and handed to the other consumers (`consumers` calls with the
    same input tensor object), then the reference is dropped so no activation outlives the forward."""

    kind, label = "duquant", "online DuQuant rotations and permutations"

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict) -> "OnlineDuQuant":
        if "shared_with" in spec:
            raise UserError("internal: a shared DuQuant transform is installed from its owner (install_all)")
        return cls(tensors)

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.consumers = 1
        self._memo: tuple | None = None  # (input tensor, its version, {form: result}, hits)
        self._built: tuple | None = None  # (buffers it was built from, DuQuantTransform)
        for k in ("rot1", "perm", "rot2"):
            if k not in tensors:
                raise UserError(f"DuQuant transform tensor {k!r} is missing from the checkpoint")
        self.register_buffer("rot1", tensors["rot1"])
        self.register_buffer("perm", tensors["perm"].long())
        self.register_buffer("rot2", tensors["rot2"])
        self.register_buffer("smooth_scale", tensors.get("smooth_scale"))

    def transform(self):
        """The DuQuantTransform over the current buffers, validated once (rebuilt only after .to() etc.)."""
        from ..quantization.duquant import DuQuantTransform

        b = self._buffers  # not the attributes: nn.Module's __getattr__ costs a microsecond each, per consumer call
        bufs = (b["smooth_scale"], b["rot1"], b["perm"], b["rot2"])
        if self._built is None or any(a is not b for a, b in zip(self._built[0], bufs)):
            self._built = (bufs, DuQuantTransform(*bufs))
        return self._built[1]

    def _shared(self, x: torch.Tensor, form, compute):
        """compute() once per input tensor (and version) and form for all `consumers`, who each call once."""
        version = None if x.is_inference() else x._version
        m = self._memo
        if m is not None and m[0] is x and m[1] == version:
            results, hits = m[2], m[3] + 1
        else:
            results, hits = {}, 1
        if form not in results:
            results[form] = compute()
        self._memo = (x, version, results, hits) if hits < self.consumers else None
        return results[form]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared(x, None, lambda: self.transform().apply(x))

    def quantized(self, x: torch.Tensor, act_spec):
        """The per-token quantization of forward(x) (`grid.quantize_per_token_affine`), computed in one fused pass
        where the CPU kernel runs (`DuQuantTransform.apply_quantized`); None elsewhere, and then the caller runs
        forward and quantizes. Counts as this consumer's call when not None."""
        t = self.transform()
        args = t.native_args(x)
        if args is None:
            return None
        return self._shared(x, act_spec, lambda: t.apply_quantized(x, act_spec, args))

    def quantizer(self, x: torch.Tensor, act_spec):
        """`quantized` for inputs shaped like ``x`` as a callable whose checks ran once (QuantLinear's call plans);
        None where the fused kernel does not run."""
        run = self.transform().quantized_plan(x, act_spec)
        if run is None:
            return None
        return lambda x: self._shared(x, act_spec, lambda: run(x))


@register_transform
class OnlineScale(nn.Module):
    kind, label = "scale", "online smoothing scales (SmoothQuant, where no fold is possible, e.g. GQA values)"

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict) -> "OnlineScale":
        if "smooth_scale" not in tensors:
            raise UserError("smoothing transform tensor 'smooth_scale' is missing from the checkpoint")
        return cls(tensors["smooth_scale"])

    def __init__(self, smooth_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("smooth_scale", smooth_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / self.smooth_scale.float()).to(x.dtype)


def build(spec: dict, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
    """The registered module for `spec` (None when the spec asks for no transform)."""
    kind = spec.get("type")
    if kind is None:
        return None
    cls = TRANSFORMS.get(kind)
    if cls is None:
        raise UserError(f"unknown online transform {kind!r} in the checkpoint; upgrade dllmq "
                        f"(this version knows: {', '.join(sorted(TRANSFORMS))})")
    return cls.from_spec(spec, tensors)


def tensor_names(layer: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{layer}.{TENSOR_PREFIX}.{k}": v for k, v in tensors.items()}


def install(module: nn.Module, transform: nn.Module) -> None:
    """Apply `transform` to a plain nn.Linear's input (QuantLinear has its own slot). Installing again
    replaces the previous transform (the hook reads the module's current one)."""
    from .qlinear import QuantLinear

    if isinstance(module, QuantLinear):
        module.input_transform = transform
        return
    had = isinstance(getattr(module, "input_transform", None), nn.Module)
    module.add_module("input_transform", transform)
    if not had:
        module.register_forward_pre_hook(lambda m, args: (m.input_transform(args[0]),) + tuple(args[1:]))


def owner_of(spec: dict) -> str | None:
    """The layer whose transform this one shares, or None if it owns its own."""
    return spec.get("shared_with")


class Installer:
    """Installs transforms one layer at a time on the submodules of `root` (named by full layer name minus
    `prefix`); a shared transform gets its owner's module, which then has one more consumer."""

    def __init__(self, root: nn.Module, prefix: str = "", device=None):
        self.root, self.prefix, self.device = root, prefix, device
        self.built: dict[str, nn.Module] = {}  # full layer name -> installed module

    def add(self, name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
        own = owner_of(spec)
        if own is not None:
            if own not in self.built:
                raise UserError(f"transform of {name} is shared with {own}, which has none; the checkpoint is corrupt")
            mod = self.built[own]
            mod.consumers += 1
        else:
            mod = build(spec, tensors)
            if mod is None:
                return
            if self.device is not None:
                mod = mod.to(self.device)
        self.built[name] = mod
        install(self.root.get_submodule(name[len(self.prefix):]), mod)


def install_all(root: nn.Module, specs: dict[str, dict], tensors_of, prefix: str = "", device=None) -> dict:
    """Build and install the transforms `specs` ({full layer name: spec}) on the submodules of `root`
    (whose names are the full names minus `prefix`). `tensors_of(full_name)` gives a layer's stored
    tensors. Shared transforms get their owner's module. Returns {full name: module}."""
    inst = Installer(root, prefix, device)
    for name, spec in sorted(specs.items(), key=lambda kv: owner_of(kv[1]) is not None):  # owners first
        inst.add(name, spec, {} if owner_of(spec) else tensors_of(name))
    return inst.built
