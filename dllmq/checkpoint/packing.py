"""Dense bit packing of signed low-bit integers into int32 words.

Layout (the one compressed-tensors' "pack-quantized" format describes, dense variant):

* each value is stored offset-binary: ``u = q + 2^(bits-1)``, so ``u`` is in ``[0, 2^bits)``;
* element ``i`` of a row occupies global bits ``[i*bits, (i+1)*bits)`` of that row's bit
  stream, and bit ``b`` of the stream lives in word ``b // 32`` at position ``b % 32``
  (little-endian: element 0 sits in the lowest bits of word 0);
* for widths that do not divide 32 (3-bit) a value may straddle two words;
* the last word is zero-padded; a row of ``K`` values takes ``ceil(K*bits/32)`` words.

The words are returned as int32 (what safetensors stores) although they hold 32 unsigned
bits, so the arithmetic runs in int64 and is wrapped into int32 at the end.

Everything is vectorised: values are viewed as [rows, blocks, slots], a block being the
smallest run of values that fills whole words (32/bits values for 2/4/8-bit, 32 values = 3
words for 3-bit), and each slot's word index and shift are precomputed tensors.
"""

from __future__ import annotations

import math

import torch

_WORD = 32
_MASK32 = (1 << 32) - 1


def _block(bits: int) -> tuple[int, int]:
    """(values per block, words per block) so that a block is a whole number of words."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can only pack 1..8-bit values, got {bits} bits")
    g = math.gcd(bits, _WORD)
    return _WORD // g, bits // g


def _slots(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each value slot of a block: its word, its bit shift in that word, and the slots
    whose bits continue into the next word."""
    per_block, _ = _block(bits)
    pos = torch.arange(per_block, dtype=torch.int64, device=device) * bits
    word, shift = pos // _WORD, pos % _WORD
    straddle = torch.nonzero(shift + bits > _WORD).flatten()
    return word, shift, straddle


def packed_words(n_values: int, bits: int) -> int:
    """Number of int32 words needed for `n_values` values of `bits` bits."""
    return -(-n_values * bits // _WORD)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's-complement wrap)."""
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ints ``q`` [N, K] in ``[-2^(bits-1), 2^(bits-1))`` along the last dim.

    Returns int32 [N, ceil(K*bits/32)].
    """
    if q.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(q.shape)}")
    per_block, words_per_block = _block(bits)
    n, k = q.shape
    offset = 1 << (bits - 1)
    u = q.to(torch.int64) + offset
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= (1 << bits)):
        raise ValueError(
            f"values out of range for {bits}-bit packing: [{int(q.min())}, {int(q.max())}] "
            f"not within [{-offset}, {offset - 1}]"
        )
    n_blocks = -(-k // per_block)
    pad = n_blocks * per_block - k
    if pad:
        # Pad with u = 0 so the tail bits of the last word are zero.
        u = torch.cat([u, u.new_zeros(n, pad)], dim=1)
    u = u.contiguous().view(n, n_blocks, per_block)
    word, shift, straddle = _slots(bits, q.device)
    # Bits of different values never overlap, so adding them is the same as OR-ing them.
    if words_per_block == 1:  # 2/4/8-bit: one word per block, a plain reduction
        out = (u << shift).sum(dim=-1, keepdim=True)
    else:
        out = torch.zeros(n, n_blocks, words_per_block, dtype=torch.int64, device=q.device)
        out.index_add_(2, word, (u << shift) & _MASK32)
        # high bits of the values that run past the end of their word
        out.index_add_(2, word[straddle] + 1, u[:, :, straddle] >> (_WORD - shift[straddle]))
    out = out.reshape(n, n_blocks * words_per_block)[:, : packed_words(k, bits)]
    return _to_int32(out).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [N, W] -> signed int32 [N, k]."""
    if packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D tensor, got shape {tuple(packed.shape)}")
    per_block, words_per_block = _block(bits)
    n, n_words = packed.shape
    if n_words != packed_words(k, bits):
        raise ValueError(
            f"packed tensor has {n_words} words per row; {k} values of {bits} bits need "
            f"{packed_words(k, bits)}"
        )
    words = packed.to(torch.int64) & _MASK32
    n_blocks = -(-n_words // words_per_block)
    pad = n_blocks * words_per_block - n_words
    if pad:
        words = torch.cat([words, words.new_zeros(n, pad)], dim=1)
    words = words.contiguous().view(n, n_blocks, words_per_block)
    word, shift, straddle = _slots(bits, packed.device)
    vals = words[:, :, word] >> shift
    if straddle.numel():
        vals[:, :, straddle] |= words[:, :, word[straddle] + 1] << (_WORD - shift[straddle])
    vals &= (1 << bits) - 1
    vals = vals.reshape(n, n_blocks * per_block)[:, :k]
    return (vals - (1 << (bits - 1))).to(torch.int32).contiguous()


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0 (used for zero points [N, G] -> [ceil(N*bits/32), G])."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_cols`: int32 [ceil(n*bits/32), G] -> signed int32 [n, G]."""
    return unpack_rows(packed.t(), bits, n).t().contiguous()
