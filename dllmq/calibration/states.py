"""What the model sees during calibration (--calib-mask none | random | tmas).

- none:   clean text, as the QDLM study calibrates (AR-style).
- random: one mask ratio t ~ U(0,1] per sequence, as in LLaDA's training.
- tmas:   DLLMQuant's temporal-mask adaptive sampling: the full-precision model runs its own
          sampler (semi-autoregressive blocks, low-confidence remasking) on the calibration
          prompts; the denoising steps are split into `segments` equal spans and states are
          drawn from each span in set `proportions` (paper: [0.3, 0.2, 0.2, 0.3]), so the
          calibration covers mask ratios from almost all masked to almost none.
          Choices the paper leaves open (documented here): segments are spans of denoising
          *steps* (not mask-ratio buckets); each prompt contributes `states_per_prompt` states;
          the prompt is the chat prompt (Instruct) or the first half of a text item / window.

TMAS allocation (:func:`allocate_states`): the proportions apply to the whole calibration set,
not to each batch. With G generation batches and S = states_per_prompt, G * S states are split
over the spans by largest remainder (each span's count is within one state of p_s * G * S;
rounding per batch would make 0.3/0.2/0.2/0.3 uniform at S = 4), then dealt to the batches
column-wise so every span with a positive count appears and each batch gets S distinct steps.
The prompts of one batch go through one sampler call, so they share their step indices: a
picked step yields one state for every prompt of that batch. The description (manifest) lists
every state's batch, step, span and mask ratio, and the per-span counts.

Padding never counts: every batch carries `valid` (False at EOS padding after a chat response
or a short text, and at TMAS left padding; None when every position is real), and the pipeline
drops those rows from Hessians, activation maxima and AWQ statistics.

Every state also carries the full-precision model's confidence per token (for CGQ): for a
masked position, the top-1 probability of its prediction; for a visible one, the probability
of the visible token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..diffusion.generation import GenerationConfig, generate_ids, left_pad
from ..errors import UserError
from .batch import CalibBatch
from .data import encode_batch, random_masked, resolve_windows

MASK_MODES = ("none", "random", "tmas")


@dataclass
class CalibrationSet:
    batches: list[CalibBatch]
    description: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(int(b.ids.numel()) for b in self.batches)


@dataclass
class TMASConfig:
    proportions: tuple[float, ...] = (0.3, 0.2, 0.2, 0.3)
    states_per_prompt: int = 4
    gen_length: int = 64
    block_length: int = 32
    steps: int = 64

    def validate(self) -> None:
        if not self.proportions or any(p < 0 for p in self.proportions) or abs(sum(self.proportions) - 1) > 1e-6:
            raise UserError(f"--tmas-proportions must be non-negative and sum to 1, got {list(self.proportions)}")
        if self.gen_length % self.block_length or self.steps % (self.gen_length // self.block_length):
            raise UserError("TMAS: --tmas-block-length must divide --tmas-gen-length, and steps must be a multiple "
                            "of the number of blocks")
        if self.steps < len(self.proportions):
            raise UserError("TMAS: need at least one denoising step per segment")
        if not 1 <= self.states_per_prompt <= self.steps:
            raise UserError(f"TMAS: states per prompt must be between 1 and the number of steps ({self.steps})")


def span_bounds(total: int, k: int, s: int) -> tuple[int, int]:
    """Steps [lo, hi) of span s when `total` denoising steps are cut into k equal spans."""
    lo = s * total // k
    return lo, max(lo + 1, (s + 1) * total // k)


def span_counts(proportions: tuple[float, ...], n: int) -> list[int]:
    """Largest-remainder split of n states by proportions: each count within one of p_s * n."""
    exact = [p * n for p in proportions]
    counts = [int(e) for e in exact]  # floor (exact >= 0)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def allocate_states(total: int, proportions: tuple[float, ...], n_batches: int, per_batch: int,
                    gen: torch.Generator) -> list[list[tuple[int, int]]]:
    """-> for each batch, `per_batch` distinct (step, span) pairs, sorted by step.

    The n_batches * per_batch states are split over the spans by largest remainder on the whole
    set, the span labels (in span order) are dealt column-wise to the batches (batch j gets
    labels j, j + n_batches, ...: each span spread evenly, every span with a state appears),
    and each batch draws its steps within a span without repetition. Should a batch need more
    distinct steps from a span than it has (very few steps), the excess moves to the nearest
    span with room in that batch."""
    k = len(proportions)
    per_batch = min(per_batch, total)
    labels = [s for s, c in enumerate(span_counts(proportions, n_batches * per_batch)) for _ in range(c)]
    room = [span_bounds(total, k, s)[1] - span_bounds(total, k, s)[0] for s in range(k)]
    out = []
    for j in range(n_batches):
        want = [0] * k
        for s in labels[j::n_batches]:
            want[s] += 1
        for s in range(k):  # repair: a span cannot give more distinct steps than it holds
            while want[s] > room[s]:
                t = min((t for t in range(k) if want[t] < room[t]), key=lambda t: (abs(t - s), t))
                want[s] -= 1
                want[t] += 1
        picks = []
        for s, c in enumerate(want):
            lo, hi = span_bounds(total, k, s)
            picks.extend((lo + int(i), s) for i in torch.randperm(hi - lo, generator=gen)[:c])
        out.append(sorted(picks))
    return out


def segment_steps(total: int, proportions: tuple[float, ...], n: int, gen: torch.Generator) -> list[int]:
    """n distinct step indices for one batch alone (proportions rounded on n states only; the
    calibration set uses :func:`allocate_states`, which rounds over all batches together)."""
    return [step for step, _ in allocate_states(total, proportions, 1, n, gen)[0]]


@torch.no_grad()
def confidence_of(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.max(-1).values
    vis = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(masked, top, vis)


def build(items: list[dict], tok, mask_id: int, mode: str, seq_len: int, seed: int = 0, batch_size: int = 8,
          fp_model=None, want_confidence: bool = False, tmas: TMASConfig | None = None,
          show_progress: bool = False) -> CalibrationSet:
    """Calibration batches from `items` (see sources.load_items); text-source items become seeded
    windows of exactly seq_len tokens here (data.resolve_windows), every batch carries `valid`."""
    if mode not in MASK_MODES:
        raise UserError(f"--calib-mask must be one of {', '.join(MASK_MODES)}, got {mode!r}")
    try:
        items, win = resolve_windows(tok, items, seq_len, seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    if mode == "tmas":
        if fp_model is None:
            raise UserError("TMAS needs the full-precision model to run its sampler")
        cset = _tmas(items, tok, fp_model, tmas or TMASConfig(), seq_len, seed, batch_size, show_progress)
        cset.description.update(win)
        return cset
    ids, maskable, valid = encode_batch(tok, items, seq_len)
    noisy = ids if mode == "none" else random_masked(ids, maskable, mask_id, seed)
    batches = []
    for b in range(0, len(items), batch_size):
        x = noisy[b : b + batch_size]
        v = valid[b : b + batch_size]
        batches.append(CalibBatch(ids=x, attention_mask=None, masked=x == mask_id, valid=None if bool(v.all()) else v))
    if want_confidence:
        if fp_model is None:
            raise UserError("CGQ needs the full-precision model's confidences")
        from .fp_model import device_of, iter_logits

        from ..ui import bar

        dev = device_of(fp_model)
        # one pass over the weights for every batch (a streamed model reads each block once)
        with bar("calibration (confidences)", total=len(batches), info="", show=show_progress) as b:
            if b and hasattr(fp_model, "on_block"):
                fp_model.on_block = lambda done, blocks: b.update(info=f"block {done}/{blocks}")
            try:
                for j, (cb, logits) in enumerate(zip(batches, iter_logits(fp_model, [(cb.ids.to(dev), None)
                                                                                     for cb in batches]))):
                    cb.confidence = confidence_of(logits.cpu(), ids[j * batch_size : (j + 1) * batch_size], cb.masked)
                    del logits
                    b.advance(1)
            finally:
                if hasattr(fp_model, "on_block"):
                    fp_model.on_block = None
    return CalibrationSet(batches, {"mode": mode, "samples": len(items), "seq_len": seq_len, "seed": seed,
                                    "mask_ratio": float(noisy.eq(mask_id).float().mean()),
                                    "padding_tokens": int((~valid).sum()), **win})


def _prompt_ids(tok, item: dict, seq_len: int) -> list[int]:
    if "prompt" in item:
        p = tok.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=False,
                                    add_generation_prompt=True)
        return tok(p, add_special_tokens=False).input_ids[-seq_len:]
    ids = list(item["ids"]) if "ids" in item else tok(item["text"], add_special_tokens=False).input_ids
    ids = ids[:seq_len]
    return ids[: max(1, len(ids) // 2)]


@torch.no_grad()
def _tmas(items, tok, model, cfg: TMASConfig, seq_len, seed, batch_size, show_progress) -> CalibrationSet:
    cfg.validate()
    gen = torch.Generator().manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt_room = max(8, seq_len - cfg.gen_length)
    batches, ratios, states = [], [], []
    gcfg = GenerationConfig(steps=cfg.steps, gen_length=cfg.gen_length, block_length=cfg.block_length, seed=seed)
    starts = list(range(0, len(items), batch_size))
    # the proportions apply to all G * S states together (see the module docstring)
    plan = allocate_states(cfg.steps, cfg.proportions, len(starts), cfg.states_per_prompt, gen)
    runs = []  # per batch: (prompt ids, step -> span, captured states, sampler call)
    for j, b in enumerate(starts):
        chunk = items[b : b + batch_size]
        seqs = [_prompt_ids(tok, it, prompt_room) for it in chunk]
        ids, am = left_pad(seqs, pad)
        span_of = dict(plan[j])
        captured: dict[int, tuple] = {}
        tick: list = []  # [callable] while a progress bar follows this batch's steps

        def on_step(state, picks=set(span_of), captured=captured, tick=tick):
            if tick:  # progress: one sampler step of this batch done
                tick[0]()
            if state["step"] in picks:  # one sampler call per batch: its prompts share these step indices
                x = state["x_before"].cpu()
                mk = x == model.mask_token_id
                conf = confidence_of(state["logits"].cpu(), x, mk)
                captured[state["step"]] = (x, mk, conf, state.get("attention_mask"))

        def sample(logits_fn=None, ids=ids, am=am, on_step=on_step, tick=tick, step_done=None):
            tick[:] = [step_done] if step_done else []
            generate_ids(model, ids, am, gcfg, on_step=on_step, logits_fn=logits_fn)

        runs.append((ids, span_of, captured, sample))
    from ..ui import bar
    from .fp_model import LayerwiseLM, run_lockstep

    # progress (the active display, if any): one unit per batch and denoising step
    with bar("calibration (TMAS)", total=len(runs) * cfg.steps, info=f"{len(runs)} batches x {cfg.steps} steps",
             show=show_progress) as b:
        if isinstance(model, LayerwiseLM):  # every batch's sampler in lockstep: one pass over the weights per step
            passes = [0]

            def on_block(done, blocks):  # a pass serves one step of every batch: advance block by block
                passes[0] += done == blocks
                b.advance(len(runs) / blocks, info=f"step {min(passes[0] + 1, cfg.steps)}/{cfg.steps}, "
                                                   f"{len(runs)} batches in lockstep")

            model.on_block = on_block if b else None
            try:
                run_lockstep(model, [r[3] for r in runs])
            finally:
                model.on_block = None
        else:
            for j, r in enumerate(runs):
                b.update(info=f"batch {j + 1}/{len(runs)}")
                r[3](step_done=lambda: b.advance(1))
        b.update(completed=len(runs) * cfg.steps)  # exact, whatever the rounding of the fractional advances
    for j, (ids, span_of, captured, _) in enumerate(runs):
        for step in sorted(span_of):
            x, mk, conf, m = captured[step]
            mask = None if m is None or bool(m.all()) else m.cpu()
            valid = None if mask is None else mask.bool()  # left padding of shorter prompts is padding
            batches.append(CalibBatch(ids=x, attention_mask=mask, masked=mk, confidence=conf, valid=valid))
            ratios.append(float(mk[:, ids.shape[1]:].float().mean()))
            states.append({"batch": j, "step": step, "span": span_of[step], "mask_ratio": round(ratios[-1], 3)})
    counts = [sum(1 for st in states if st["span"] == s) for s in range(len(cfg.proportions))]
    return CalibrationSet(batches, {"mode": "tmas", "samples": len(items), "seed": seed,
                                    "proportions": list(cfg.proportions), "states_per_prompt": cfg.states_per_prompt,
                                    "gen_length": cfg.gen_length, "block_length": cfg.block_length,
                                    "steps": cfg.steps, "prompts_share_steps_within_batch": True,
                                    "span_counts": counts, "states": states,
                                    "mask_ratios": [round(r, 3) for r in ratios]})
