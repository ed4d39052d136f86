"""QuaRot: function-preserving Hadamard rotations that remove activation outliers before quantization.

Driven only by the family's ArchSpec (feeds, blocks_path, attn_out, mlp_down, embed/final-norm/head
names), so LLaDA, Dream and any family with the same pre-norm layout share the code.

Steps (all in float64, written back in each parameter's dtype):
  1. `fuse_norms`: every RMSNorm's weight (and bias) goes into the linears it feeds; norms become
     x / rms(x) (weight 1), which commutes with any orthogonal Q since ||x Q|| = ||x||.
  2. residual rotation by Q (transform x -> x @ Q, Q = random_hadamard(d, seed).T): the embedding and
     the input side of every reader of the residual stream (q/k/v, gate/up, LM head) get W <- W Q,
     the writers (attention out, FFN down) W <- Q^T W and b <- b Q.
  3. per-head Hadamard on values: v_proj output rows and attention-out input columns, head by head,
     with the same H_head on every head so it commutes with the GQA kv-head repeat (exact, offline).
  4. FFN down projection: W_down <- W_down H^T / sqrt(n) offline, plus an *online* transform
     z -> z H^T / sqrt(n) of its input (`apply_online`), which spreads the massive outliers there.

The returned description of online transforms maps full module names to what must be applied to
that module's input at inference:
    {"model.transformer.blocks.0.ff_out": {"type": "hadamard", "size": 12288, "location": "input"}, ...}
"hadamard" means `fast_hadamard_transform(x)` = x @ hadamard_matrix(size).T / sqrt(size) on the
last dim (deterministic: no random signs).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .hadamard import fast_hadamard_transform, hadamard_factor, random_signs

__all__ = ["apply_online", "fuse_norms", "remove_online", "rotate_block", "rotate_model", "rotate_outer"]

_CHUNK = 4096  # rows processed at a time in float64 (bounds the temporary memory on 8B models)
Fn = Callable[[torch.Tensor], torch.Tensor]


def _transform_rows(w: torch.Tensor, fn: Fn) -> None:
    """In place: each row r of w (2-D) becomes fn(r) (fn maps float64 [R, C] -> [R, C])."""
    for i in range(0, w.shape[0], _CHUNK):
        blk = w[i : i + _CHUNK]
        blk.copy_(fn(blk.double()).to(w.dtype))


def _transform_cols(w: torch.Tensor, fn: Fn) -> None:
    """In place: each column c of w becomes fn(c), i.e. w <- fn(w^T)^T."""
    for j in range(0, w.shape[1], _CHUNK):
        blk = w[:, j : j + _CHUNK]
        blk.copy_(fn(blk.t().double()).t().to(w.dtype))


def _per_head(head_dim: int) -> Fn:
    def fn(x: torch.Tensor) -> torch.Tensor:
        r, c = x.shape
        return fast_hadamard_transform(x.reshape(r, c // head_dim, head_dim)).reshape(r, c)

    return fn


def _cross_head(heads: int, head_dim: int) -> Fn:
    """x [R, heads*head_dim] -> the normalised Hadamard across heads, per head_dim coordinate."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        r = x.shape[0]
        y = x.reshape(r, heads, head_dim).transpose(1, 2)
        return fast_hadamard_transform(y).transpose(1, 2).reshape(r, heads * head_dim)

    return fn


def _head_module(model) -> nn.Linear | None:
    """The LM head linear, or None when the head is tied to the embedding."""
    if model.config.tie_word_embeddings:
        return None
    return model.get_submodule(model.arch.head_name)


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    w = norm.weight.detach().double()
    b = getattr(norm, "bias", None)
    b = b.detach().double() if isinstance(b, torch.Tensor) else None
    for lin in linears:
        lw = lin.weight.detach().double()
        if b is not None and bool(b.any()):
            extra = lw @ b  # W (x w + b) + c = (W diag(w)) x + (W b + c)
            if lin.bias is None:
                lin.bias = nn.Parameter(extra.to(lin.weight.dtype), requires_grad=lin.weight.requires_grad)
            else:
                lin.bias.copy_((lin.bias.double() + extra).to(lin.bias.dtype))
        lin.weight.copy_((lw * w[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        norm.bias.zero_()


@torch.no_grad()
def fuse_norms(model) -> None:
    """Fold every norm's weight/bias into the linears it feeds (attention norm -> q,k,v; FFN norm ->
    gate,up; final norm -> LM head) and set the norms to weight 1, bias 0. Function-preserving;
    idempotent. Raises ValueError for a tied LM head whose final norm is not already trivial."""
    arch = model.arch
    for blk in model.blocks:
        for f in arch.feeds:
            if f.kind == "norm":
                _fold_norm(blk.get_submodule(f.source), [blk.get_submodule(t) for t in f.targets])
    final = model.get_submodule(arch.final_norm_name)
    head = _head_module(model)
    if head is None:
        fb = getattr(final, "bias", None)
        if not bool((final.weight == 1).all()) or (isinstance(fb, torch.Tensor) and bool(fb.any())):
            raise ValueError(
                "the LM head is tied to the embedding, so the final norm's weight cannot be folded into it; "
                "untie the head first"
            )
        return
    _fold_norm(final, [head])


def _structure(arch) -> tuple[list[str], list[str], str | None]:
    """(readers of the residual stream, writers to it, the value projection) inside a block."""
    readers = [t for f in arch.feeds if f.kind == "norm" for t in f.targets]
    writers = [arch.attn_out, arch.mlp_down]
    other = [n for n in arch.block_linears if n not in readers and n not in writers]
    if other:
        raise NotImplementedError(
            f"QuaRot: {arch.family} block linears {other} neither read a norm output nor write the residual stream"
        )
    v = [f.source for f in arch.feeds if f.kind == "linear" and f.targets == (arch.attn_out,)]
    return readers, writers, (v[0] if v else None)


def residual_rotation(d: int, seed: int) -> Fn:
    """x -> x @ Q with Q = H diag(signs) / sqrt(d) (random Hadamard, seeded)."""
    signs = random_signs(d, seed)

    def rot(x: torch.Tensor) -> torch.Tensor:
        return fast_hadamard_transform(x * signs.to(x.device))

    return rot


def check_sizes(arch, cfg, heads: bool = True, online_down: bool = True) -> None:
    """Raise ValueError (saying why) before any weight changes if a size has no Hadamard here."""
    _readers, _writers, v_name = _structure(arch)
    hadamard_factor(cfg.hidden_size)
    if heads and v_name is not None:
        hadamard_factor(cfg.head_dim)
        hadamard_factor(cfg.num_heads)
    if online_down:
        hadamard_factor(cfg.intermediate_size)


@torch.no_grad()
def rotate_block(blk: nn.Module, arch, cfg, seed: int = 0, *, heads: bool = True, online_down: bool = True,
                 fuse: bool = True) -> dict:
    """QuaRot on one block (norm fusion, residual rotation, per-head values, down projection).

    Returns the online transforms of this block keyed by the linear's name *inside* the block."""
    readers, writers, v_name = _structure(arch)
    if fuse:
        for f in arch.feeds:
            if f.kind == "norm":
                _fold_norm(blk.get_submodule(f.source), [blk.get_submodule(t) for t in f.targets])
    rot = residual_rotation(cfg.hidden_size, seed)
    for name in readers:
        _transform_rows(blk.get_submodule(name).weight, rot)
    for name in writers:
        lin = blk.get_submodule(name)
        _transform_cols(lin.weight, rot)
        if lin.bias is not None:
            _transform_rows(lin.bias.view(1, -1), rot)
    if heads and v_name is not None:
        head_fn = _per_head(cfg.head_dim)
        v, o = blk.get_submodule(v_name), blk.get_submodule(arch.attn_out)
        _transform_cols(v.weight, head_fn)  # v' = v per-head-transformed
        if v.bias is not None:
            _transform_rows(v.bias.view(1, -1), head_fn)
        _transform_rows(o.weight, head_fn)  # o reads the transformed values
    online: dict[str, dict] = {}
    if heads and v_name is not None and cfg.num_heads > 1:
        # QuaRot's online half of the o_proj input rotation: H_heads across heads, which with the per-head
        # H_head above makes the full Hadamard H_heads (x) H_head of the o_proj input (spreads outliers
        # between heads too). Offline: W_o <- W_o (H_heads (x) I); online: the same transform of its input.
        o = blk.get_submodule(arch.attn_out)
        _transform_rows(o.weight, _cross_head(cfg.num_heads, cfg.head_dim))
        online[arch.attn_out] = {"type": "hadamard_heads", "heads": cfg.num_heads, "head_dim": cfg.head_dim,
                                 "location": "input"}
    if online_down:
        down = blk.get_submodule(arch.mlp_down)
        n = down.weight.shape[1]
        _transform_rows(down.weight, fast_hadamard_transform)  # W <- W H^T / sqrt(n)
        online[arch.mlp_down] = {"type": "hadamard", "size": n, "location": "input"}
    return online


@torch.no_grad()
def rotate_outer(embed: torch.Tensor, head: torch.Tensor | None, final_norm: torch.Tensor | None, cfg,
                 seed: int = 0) -> None:
    """In place on the tensors outside the blocks: fold the final norm into the LM head, rotate the
    embedding rows and the head's input side (a tied head is rotated through the embedding)."""
    rot = residual_rotation(cfg.hidden_size, seed)
    if head is not None and final_norm is not None:
        head.copy_((head.double() * final_norm.double()[None, :]).to(head.dtype))
        final_norm.fill_(1.0)
    _transform_rows(embed, rot)
    if head is not None:
        _transform_rows(head, rot)


@torch.no_grad()
def rotate_model(model, seed: int = 0, *, heads: bool = True, online_down: bool = True) -> dict:
    """Apply QuaRot's rotations in place (fusing norms first); returns the online transforms needed.

    The rotated model computes the same function as the original once `apply_online(model, result)`
    is installed (without it only the FFN down projections see the wrong input). `seed` picks the
    random signs of the residual rotation. `heads=False` skips the per-head value/output Hadamard,
    `online_down=False` the FFN down-projection one (then the result is {} and no hooks are needed).
    """
    arch, cfg = model.arch, model.config
    _structure(arch)
    check_sizes(arch, cfg, heads, online_down)
    for blk in model.blocks:  # sizes of every block's down projection (intermediate may vary)
        if online_down:
            hadamard_factor(blk.get_submodule(arch.mlp_down).weight.shape[1])
    fuse_norms(model)
    rot = residual_rotation(cfg.hidden_size, seed)
    _transform_rows(model.get_submodule(arch.embed_name).weight, rot)
    head = _head_module(model)
    if head is not None:  # tied: the embedding rotation already did it
        _transform_rows(head.weight, rot)
    online: dict[str, dict] = {}
    for i, blk in enumerate(model.blocks):
        local = rotate_block(blk, arch, cfg, seed, heads=heads, online_down=online_down, fuse=False)
        online.update({f"{arch.blocks_path}.{i}.{k}": v for k, v in local.items()})
    return online


def apply_online(model: nn.Module, transforms: dict) -> None:
    """Install the recorded online transforms on the named modules' inputs, through the runtime's own
    transforms (dllmq.runtime.transforms). Re-installing replaces, never applies twice."""
    from ..runtime.transforms import build, install

    for name, spec in transforms.items():
        if spec.get("location", "input") != "input":
            raise ValueError(f"unsupported online transform for {name}: {spec}")
        mod = model.get_submodule(name)
        size = int(spec.get("size", getattr(mod, "in_features", 0)))
        if spec.get("type") == "hadamard" and getattr(mod, "in_features", size) != size:
            raise ValueError(f"{name} reads {mod.in_features} features but the online Hadamard has size {size}")
        install(mod, build({k: v for k, v in spec.items() if k != "location"}, {}))


def remove_online(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(getattr(mod, "input_transform", None), nn.Module):
            mod.input_transform = nn.Identity()
