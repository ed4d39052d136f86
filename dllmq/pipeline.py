"""The quantization pipeline: model folder -> quantized dllmq checkpoint.

Block by block: materialise block i from the shards, let the method transform it, collect the
statistics it needs from the calibration batches (hooks on the linears), quantize its linears
group by group (q/k/v, then o, then gate/up, then down: each group sees the quantized outputs of
the previous ones), recompute the block's outputs with the quantized weights as the next block's
inputs, write the block's shard, free it. Peak memory is one block plus the cached activations.
After each block, progress and the next inputs are saved in the partial folder, so `--resume`
continues an interrupted run and writes the same tensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .calibration.block_transform import make_capture, transform_block
from .calibration.blocks import BlockStream, HiddenCache
from .calibration.capture import read_inputs, real_rows
from .calibration.states import CalibBatch, CalibrationSet, TMASConfig
from .checkpoint.format import QuantizationConfig
from .checkpoint.serialize import packed_tensors
from .checkpoint.writer import CheckpointWriter, check_target
from .errors import UserError
from .models.loading import ShardReader, build_empty, load_tokenizer, parse, read_config, resolve_model_path
from .quantization.methods import get_method
from .quantization.qweight import QuantizedWeight
from .runtime import transforms as online_transforms
from .runtime.native import native_bf16
from .ui import progress
from .validation import resolve_device


@dataclass
class CalibOptions:
    calib: str = "bundled"
    samples: int = 32
    seq_len: int = 128
    mask: str = "tmas"
    seed: int = 0
    batch_size: int = 8
    tmas: TMASConfig = field(default_factory=TMASConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tmas"] = asdict(self.tmas)
        return d


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rel_error: float  # relative output error on calibration inputs (weight error when uncalibrated)
    seconds: float
    error_kind: str = "weight"
    extra: dict = field(default_factory=dict)


@dataclass
class QuantizeResult:
    out: Path
    layers: list[LayerReport]
    seconds: float
    source: Path
    calibration: dict | None = None


def compile_ignore(patterns: list[str]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise UserError(f"--ignore pattern {p!r} is not a valid regular expression ({e})") from None
    return out


def calibration_dtype(dtype: torch.dtype | str, method, device: str) -> torch.dtype:
    """The dtype the blocks compute in during calibration. "auto": bfloat16 where the hardware computes it natively and
    the method only reads activations (GPTQ; RTN reads none), as AutoGPTQ runs the 16-bit model; the weights are
    still quantized as stored and the Hessian accumulates in float32. float32 for methods that rewrite weights
    (AWQ, SmoothQuant, QuaRot, DuQuant: a bf16 block would round their transformed weights) and on other hardware."""
    if dtype != "auto":
        return dtype
    return torch.bfloat16 if not method.rewrites_weights and native_bf16(device) else torch.float32


def sequential_groups(arch) -> list[list[str]]:
    """Linears that share an input, in execution order (from the registry's feeds)."""
    groups, seen = [], set()
    for lin in arch.block_linears:
        if lin in seen:
            continue
        feed = next((f for f in arch.feeds if lin in f.targets), None)
        g = [t for t in (feed.targets if feed else (lin,)) if t not in seen]
        seen.update(g)
        groups.append(g)
    return groups


def _rel_output_error(w: torch.Tensor, wh: torch.Tensor, H: torch.Tensor | None) -> tuple[float, str]:
    d = (w - wh).float()
    if H is None:
        return float(d.norm() / w.norm().clamp(min=1e-12)), "weight"
    num = torch.einsum("nk,kl,nl->", d, H, d)
    den = torch.einsum("nk,kl,nl->", w.float(), H, w.float())
    return float((num.clamp(min=0) / den.clamp(min=1e-30)).sqrt()), "output"


def quantize(
    model: str | Path | None,
    qcfg: QuantizationConfig,
    out: str | Path,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: torch.dtype | str = "auto",
    revision: str | None = None,
    command: str | None = None,
    method_options: dict | None = None,
    calib: CalibOptions | None = None,
    sequential: bool = True,
    offload_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> QuantizeResult:
    t_start = time.time()
    device = resolve_device(device)  # "auto": CUDA when available
    out = Path(out)
    check_target(out, overwrite)  # fail fast, before reading gigabytes
    src = resolve_model_path(model, revision)
    raw = read_config(src)
    if "quantization_config" in raw:
        raise UserError(f"{src} is already quantized; quantize the full-precision model instead")
    arch, config = parse(src)
    reader = ShardReader(src)
    method = get_method(qcfg.method)(qcfg, **(method_options or {}))  # validated, paper defaults filled in
    method_options = dict(method.options)
    qcfg.method_args = method_options  # the full resolved options, also for checkpoints made from Python
    method.check(arch, config)
    dtype = calibration_dtype(dtype, method, device)
    ignore = compile_ignore(qcfg.ignore)
    calib = calib or CalibOptions()

    # Targets and shape checks before anything is written.
    targets: list[str] = []
    for i in range(config.num_layers):
        for lin in arch.block_linears:
            name = f"{arch.blocks_path}.{i}.{lin}"
            if any(p.fullmatch(name) for p in ignore):
                continue
            if f"{name}.weight" not in reader:
                raise UserError(f"tensor {name}.weight is missing from {src}; the checkpoint is incomplete")
            targets.append(name)
    if not targets:
        raise UserError(f"--ignore {' '.join(qcfg.ignore[len(arch.default_ignore()):]) or '(defaults)'} leaves no "
                        "layer to quantize; loosen the patterns (they match full layer names with re.fullmatch)")
    for name in targets:
        h = reader._handle(reader.map[f"{name}.weight"])
        qcfg.weights.check_layer(name, h.get_slice(f"{name}.weight").get_shape()[1])
    qcfg.quantized_layers = targets
    target_set = set(targets)

    run_key = hashlib.sha256(json.dumps(
        {"src": str(src.resolve()), "q": qcfg.to_dict(), "opts": method_options or {}, "calib": calib.to_dict(),
         "seq": sequential, "dtype": str(dtype)}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    writer = CheckpointWriter(out, overwrite, resume=resume, run_key=run_key)
    skeleton = build_empty(arch, config)
    stream = BlockStream(skeleton, reader, device, dtype)
    reports: list[LayerReport] = [LayerReport(**r) for r in writer.progress.get("reports", [])]
    start_block = int(writer.progress.get("blocks_done", 0))
    qcfg.transforms = dict(writer.progress.get("transforms", {}))
    calib_desc = writer.progress.get("calibration")
    created = writer.progress.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    with writer, progress(show_progress) as prog:
        batches: list[CalibBatch] = []
        cache = None
        if method.needs_calibration:
            state_file = writer.state_dir / "calibration.safetensors"
            if writer.resumed and state_file.exists():
                batches = _load_batches(state_file)
            else:
                cset = _build_calibration(src, arch, calib, method.wants_confidence, device, prog)
                batches, calib_desc = cset.batches, cset.description
                _save_batches(batches, state_file)
        # after the calibration's full-precision model is gone: the two never take memory together
        nonblock = _nonblock(reader, arch, config, method) if start_block == 0 else None
        if method.needs_calibration:
            cache = HiddenCache(len(batches), offload_dir)
            if start_block == 0:
                stream.embed(batches, cache, nonblock[f"{arch.embed_name}.weight"])
            else:
                hidden = load_file(str(writer.state_dir / "hidden.safetensors"))
                for j in range(len(batches)):
                    cache.set(j, hidden[f"h{j}"])
        if start_block == 0:
            writer.write_shard("a-nonblock", nonblock)
            del nonblock
            writer.save_progress({"blocks_done": 0, "created": created, "calibration": calib_desc, "reports": []})

        # One unit of the bar = one block, which is what costs time: its forward passes over every calibration
        # batch (statistics, then the next block's inputs), the quantization of its linears, its shard. Inside a
        # block the bar advances stage by stage in proportion to the weights involved (_BlockWork), and the ETA
        # is the time per block so far times the blocks left (ui.EtaColumn).
        n_layers = config.num_layers
        groups = sequential_groups(arch) if sequential else None  # the same for every block
        task = prog.add_task("quantize", total=n_layers, completed=start_block, done_before=start_block,
                             info="") if prog else None
        for i in range(start_block, config.num_layers):
            prefix = f"{arch.blocks_path}.{i}."
            work = _BlockWork(prog, task, i, n_layers, len(reports), len(targets))
            work.stage("reading the block")
            blk = stream.materialize(i)
            local_targets = [n for n in arch.block_linears if prefix + n in target_set]
            work.plan(blk, local_targets, groups or [local_targets],
                      method.needs_calibration)

            capture = make_capture(blk, lambda on_batch, blk=blk: stream.run(blk, batches, cache, on_batch=on_batch),
                                   lambda j: _valid_rows(batches[j]), seed=i)
            specs = transform_block(method, blk, i, prefix, arch, config, capture, device)
            qcfg.transforms.update({prefix + n: s for n, s in specs.items()})
            shared = {n for n, s in specs.items() if online_transforms.owner_of(s) is not None}
            # Each step: a group of linears and the pass that reads their inputs. Staged (sequential groups on a
            # block that runs its forward in stages, models.base.staged_forward): the batches' states are kept
            # between stages, so every group reads its inputs at the start of its stage, after the groups before it
            # were quantized, and the block costs one forward. Otherwise each group's pass reruns the block from its
            # input (and stops early), and the next block's inputs take one more full pass.
            staged = (sequential and method.needs_calibration and offload_dir is None
                      and getattr(blk, "N_STAGES", 0) == len(groups))
            if staged:
                states = [{"x": cache.get(j).to(device)} for j in range(len(batches))]
                steps = [(g, functools.partial(stream.run_stage, blk, k, batches, states))
                         for k, g in enumerate(groups)]
            else:
                run = functools.partial(stream.run, blk, batches, cache)
                steps = [(g, run) for g in (groups or [local_targets])]
            packed: dict[str, torch.Tensor] = {}
            for group, run in steps:
                group = [n for n in group if n in local_targets]
                if not group:
                    if staged:
                        run(advance=True)
                    continue
                stats = {n: method.new_stats(prefix + n) for n in group}
                if method.needs_calibration and any(s is not None for s in stats.values()):
                    work.stage(f"inputs of {', '.join(group)}")
                    _collect(run, blk, batches, stats, method)
                work.done_collect(group)
                for n in group:
                    work.stage(n)
                    t0 = time.time()
                    lin = blk.get_submodule(n)
                    w = lin.weight.detach() if method.rewrites_weights else \
                        stream.stored(f"{prefix}{n}.weight", lin.weight.detach(), rewritten=False)
                    w = w.float().to(lin.weight.device)
                    qw: QuantizedWeight = method.quantize_linear(prefix + n, w, stats[n])
                    wh = qw.dequantize(torch.float32)
                    H = getattr(stats[n], "hessian", None)
                    err, kind = _rel_output_error(w, wh, H)
                    with torch.no_grad():
                        lin.weight.copy_(wh.to(lin.weight.dtype))  # later groups see quantized outputs
                    packed.update({f"{prefix}{n}.{k}": v for k, v in packed_tensors(qw).items()})
                    reports.append(LayerReport(prefix + n, tuple(w.shape), err, round(time.time() - t0, 4), kind))
                    work.done_linear(n)
                stats.clear()
                if staged:
                    run(advance=True)  # the next group's inputs, computed with this group quantized
            tensors = {}
            for n, t in blk.state_dict().items():
                layer, leaf = n.rsplit(".", 1)
                if layer in local_targets and leaf == "weight":
                    continue
                if n.split(f".{online_transforms.TENSOR_PREFIX}.")[0] in shared:
                    continue  # a shared transform is stored once, with its owner
                tensors[prefix + n] = stream.stored(prefix + n, t, method.rewrites_weights)
            tensors.update(packed)
            work.stage("writing the shard")
            writer.write_shard(f"block-{i:05d}", tensors)
            if method.needs_calibration:
                work.stage("next block's inputs")
                nxt = HiddenCache(len(batches), Path(offload_dir) / f"b{(i + 1) % 2}" if offload_dir else None)
                if staged:
                    for j, st in enumerate(states):
                        nxt.set(j, st["x"])
                    del states
                else:
                    with torch.no_grad():
                        stream.run(blk, batches, cache, out=nxt)
                cache = nxt
                save_file({f"h{j}": cache.get(j) for j in range(len(batches))},
                          str(writer.state_dir / "hidden.safetensors"))
            stream.release(i)
            reader.close()
            writer.save_progress({"blocks_done": i + 1, "created": created, "calibration": calib_desc,
                                  "reports": [asdict(r) for r in reports], "transforms": qcfg.transforms})
            work.finish()

        raw_out = dict(raw)
        raw_out["quantization_config"] = qcfg.to_dict()
        manifest = {
            "base_model": str(model) if model else "tiny",
            "base_model_path": str(src),
            "revision": revision,
            "command": command or " ".join(sys.argv),
            "method": qcfg.method,
            "method_options": method_options or {},
            "calibration_dtype": str(dtype).removeprefix("torch."),
            "calibration": calib_desc if method.needs_calibration else None,
            "layers": [asdict(r) for r in reports],
        }
        writer.finalize(raw_out, src, manifest)
    return QuantizeResult(out, reports, time.time() - t_start, src, calib_desc)


class _BlockWork:
    """Progress inside block i of the quantize bar (one unit per block). The block's unit is split over its
    stages in proportion to their cost, estimated from the weights they touch: collecting a group's inputs
    runs the block up to that group (the weights of the groups so far), quantizing a linear costs its weight,
    and computing the next block's inputs runs the whole block. The split only shapes the bar inside a block;
    the ETA comes from whole blocks."""

    def __init__(self, prog, task, i: int, n_blocks: int, layers_done: int, layers_total: int):
        self.prog, self.task, self.i, self.n_blocks = prog, task, i, n_blocks
        self.layers_done, self.layers_total = layers_done, layers_total
        self.cost: dict = {}
        self.done = 0.0

    def plan(self, blk, local: list[str], groups: list[list[str]], calibrated: bool) -> None:
        size = {n: blk.get_submodule(n).weight.numel() for n in local}
        seen, cost = 0, {}
        for g in [[n for n in g if n in size] for g in groups]:
            if not g:
                continue
            seen += sum(size[n] for n in g)
            cost[("collect", tuple(g))] = seen if calibrated else 0
            cost.update({("linear", n): size[n] for n in g})
        cost["next"] = sum(size.values()) if calibrated else 0
        total = sum(cost.values()) or 1
        self.cost = {k: v / total for k, v in cost.items()}

    def stage(self, what: str) -> None:
        if self.prog:
            self.prog.update(self.task, info=f"block {self.i + 1}/{self.n_blocks} {what} "
                                             f"({self.layers_done}/{self.layers_total} linears)")

    def _advance(self, key) -> None:
        f = self.cost.pop(key, 0.0)
        self.done += f
        if self.prog and f:
            self.prog.update(self.task, advance=f)

    def done_collect(self, group: list[str]) -> None:
        self._advance(("collect", tuple(group)))

    def done_linear(self, n: str) -> None:
        self.layers_done += 1
        self._advance(("linear", n))

    def finish(self) -> None:
        if self.prog:  # whatever is left of the block's unit (the next inputs, rounding): exactly i + 1 blocks done
            self.prog.update(self.task, completed=self.i + 1)
        self.cost.clear()


def _nonblock(reader: ShardReader, arch, config, method) -> dict[str, torch.Tensor]:
    """Tensors outside the blocks, after the method's transform (e.g. QuaRot's rotation), in their
    original dtypes."""
    prefix = arch.blocks_path + "."
    raw = {n: reader.get(n) for n in reader.map if not n.startswith(prefix)}
    out = dict(raw)
    method.transform_nonblock(out, arch, config)
    return {n: t.to(raw[n].dtype).contiguous() for n, t in out.items()}


def _collect(run, blk, batches: list[CalibBatch], stats: dict, method) -> None:
    """Run the batches through the block (`run(on_batch=...)`: the whole block, or one stage of it), feeding each
    targeted linear's input to its stats.

    Two savings that leave the statistics unchanged:
    * the forward stops (StopBlock) once every hooked linear has seen its input, so collecting the
      inputs of q/k/v costs a norm, not a whole block;
    * linears fed the very same tensor (q/k/v, gate/up) share one accumulator when the stats say
      they may (`shareable`, e.g. a GPTQ Hessian), so XᵀX is computed once per input, not per linear.
    """
    weights = [getattr(method, "token_weights", lambda b: None)(b) for b in batches]
    hooked = [n for n, s in stats.items() if s is not None]
    alias: dict[str, str] = {}  # linear -> linear whose accumulator it shares (decided on batch 0)
    last: dict = {"j": -1, "input": None}  # the previous linear's input tensor and name, within this batch

    def feed(n, x, valid, j):
        if last["j"] != j:
            last.update(j=j, input=None)
        # the same tensor object as the previous linear's input (kept alive in last["input"], so identity
        # cannot be a reused address); linears sharing an input run back to back
        first = last["input"][1] if last["input"] is not None and last["input"][0] is x else None
        if j == 0 and first is not None and getattr(stats[n], "shareable", False) \
                and type(stats[first]) is type(stats[n]):
            alias[n] = first
        if n in alias:
            if alias[n] != first:
                raise RuntimeError(f"{n}: its input is no longer shared with {alias[n]}")
            return
        tw = weights[j]
        rows = real_rows(x, valid)  # padding never enters the statistics
        if tw is not None:
            tw = tw.reshape(-1).to(rows.device)
            tw = tw if valid is None else tw[valid.to(rows.device)]
        stats[n].add(rows, tw)
        if first is None:
            last["input"] = (x, n)

    read_inputs(blk, hooked, lambda on_batch: run(on_batch=on_batch),
                lambda j: _valid_rows(batches[j]), feed)
    for n, first in alias.items():
        stats[n] = stats[first]


def _valid_rows(b: CalibBatch) -> torch.Tensor | None:
    """Flat bool [B*L] of the real tokens of a batch (None: all real). Padding, i.e. positions the
    calibration source marks invalid or the attention mask hides, never enters statistics."""
    v = b.valid
    if v is None and b.attention_mask is not None:
        v = b.attention_mask.bool()
    if v is None or bool(v.all()):
        return None
    return v.reshape(-1).bool()


def _build_calibration(src: Path, arch, calib: CalibOptions, want_conf: bool, device: str, prog) -> CalibrationSet:
    from .calibration.sources import load_items
    from .calibration.states import build

    tok = load_tokenizer(src)
    items = load_items(calib.calib, calib.samples, calib.seed, seq_len=calib.seq_len)
    fp, fwd = None, None
    if prog:
        prog.console.print(f"calibration: {len(items)} samples, mask mode {calib.mask}")
    if calib.mask == "tmas" or want_conf:
        # TMAS runs the model's own sampler, CGQ needs its confidences: the full-precision model runs in
        # bfloat16 (float32 on CPUs that emulate bf16), whole when it fits the device, else streamed block by block (calibration/fp_model.py);
        # it is freed before the block-by-block pass.
        from .calibration.fp_model import LayerwiseLM, plan

        config = arch.parse_config(read_config(src))
        rows = calib.batch_size * (calib.seq_len + (calib.tmas.gen_length if calib.mask == "tmas" else 0))
        p = plan(src, device, activations_bytes=rows * config.vocab_size * 4 * 3)  # logits, fp32 softmax
        fp = LayerwiseLM(src, device, dtype=getattr(torch, p.dtype), whole=p.mode == "whole")
        if prog:
            prog.console.print(f"calibration model: {'whole' if p.mode == 'whole' else 'streamed one block at a time'}"
                               f" in {p.dtype} on {device} ({_gib(p.model_bytes)} GiB; {p.reason})", highlight=False)
        fwd = p
    t0 = time.perf_counter()
    cset = build(items, tok, fp.mask_token_id if fp else arch.parse_config(read_config(src)).mask_token_id,
                 calib.mask, calib.seq_len, calib.seed, calib.batch_size, fp_model=fp,
                 want_confidence=want_conf, tmas=calib.tmas)
    if fp is not None:
        st = fp.stats.to_dict()
        fp.close()
        desc = {**fwd.to_dict(), **st, "seconds": round(time.perf_counter() - t0, 3)}
        cset.description["fp_forward"] = desc
        if prog:
            prog.console.print(f"calibration model: {st['passes']} passes over the weights in {desc['seconds']:.1f} s, "
                               f"{st['load_seconds']:.1f} s of it reading blocks from the shards "
                               f"({st['block_loads']} block loads)", highlight=False)
    del fp
    cset.description.update({"source": calib.calib, "tokens": cset.n_tokens})
    return cset


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _save_batches(batches: list[CalibBatch], f: Path) -> None:
    t = {}
    for j, b in enumerate(batches):
        t[f"ids{j}"] = b.ids
        t[f"masked{j}"] = b.masked
        if b.attention_mask is not None:
            t[f"am{j}"] = b.attention_mask
        if b.confidence is not None:
            t[f"conf{j}"] = b.confidence.float()
        if b.valid is not None:
            t[f"valid{j}"] = b.valid
    save_file({k: v.contiguous().clone() for k, v in t.items()}, str(f))  # batches may be views of one tensor


def _load_batches(f: Path) -> list[CalibBatch]:
    t = load_file(str(f))
    n = sum(1 for k in t if k.startswith("ids"))
    return [CalibBatch(ids=t[f"ids{j}"], attention_mask=t.get(f"am{j}"), masked=t[f"masked{j}"],
                       confidence=t.get(f"conf{j}"), valid=t.get(f"valid{j}")) for j in range(n)]
