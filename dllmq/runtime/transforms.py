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
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

TENSOR_PREFIX = "input_transform"


class OnlineHadamard(nn.Module):
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


class OnlineHeadHadamard(nn.Module):
    """Hadamard across heads: [..., heads * head_dim] viewed as [..., heads, head_dim], H_heads on the
    heads axis. QuaRot's online half of the o_proj input rotation (the per-head half is offline)."""

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


class OnlineDuQuant(nn.Module):
    """(x / s) R1 P R2. Installed on every linear that reads the same input (q/k/v share one): the
    product is computed once per forward and handed to the other consumers (`consumers` calls with the
    same input tensor object), then the reference is dropped so no activation outlives the forward."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.consumers = 1
        self._memo: tuple | None = None  # (input tensor, its version, output, hits)
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

        bufs = (self.smooth_scale, self.rot1, self.perm, self.rot2)
        if self._built is None or any(a is not b for a, b in zip(self._built[0], bufs)):
            self._built = (bufs, DuQuantTransform(*bufs))
        return self._built[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._memo
        if m is not None and m[0] is x and m[1] == x._version:
            out, hits = m[2], m[3] + 1
        else:
            out, hits = self.transform().apply(x), 1
        self._memo = (x, x._version, out, hits) if hits < self.consumers else None
        return out


class OnlineScale(nn.Module):
    def __init__(self, smooth_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("smooth_scale", smooth_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / self.smooth_scale.float()).to(x.dtype)


def build(spec: dict, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
    kind = spec.get("type")
    if kind is None:
        return None
    if kind == "hadamard":
        return OnlineHadamard(int(spec["size"]))
    if kind == "hadamard_heads":
        return OnlineHeadHadamard(int(spec["heads"]), int(spec["head_dim"]))
    if kind == "duquant":
        if "shared_with" in spec:
            raise UserError("internal: a shared DuQuant transform is installed from its owner (install_all)")
        return OnlineDuQuant(tensors)
    if kind == "scale":
        return OnlineScale(tensors["smooth_scale"])
    raise UserError(f"unknown online transform {kind!r} in the checkpoint; upgrade dllmq")


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
