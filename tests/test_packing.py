import pytest
import torch

from dllmq.checkpoint.packing import pack_cols, pack_rows, packed_words, unpack_cols, unpack_rows

SHAPES = [(5, 7), (3, 33), (16, 128), (1, 1), (2, 95), (7, 32)]


def _rand_codes(shape, bits, gen):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int32)


def _u32(x: int) -> int:
    """Expected int32 value of an unsigned 32-bit word."""
    return x - (1 << 32) if x >= 1 << 31 else x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits * 100 + shape[1])
    q = _rand_codes(shape, bits, gen)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], -(-shape[1] * bits // 32))
    out = unpack_rows(packed, bits, shape[1])
    assert out.dtype == torch.int32
    assert torch.equal(out, q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_values(bits):
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    k = 37
    q = torch.stack(
        [
            torch.full((k,), qmin),
            torch.full((k,), qmax),
            torch.tensor([qmin, qmax] * (k // 2) + [qmin]),
            torch.zeros(k, dtype=torch.int64),
        ]
    ).to(torch.int32)
    assert torch.equal(unpack_rows(pack_rows(q, bits), bits, k), q)
    # All-ones bit pattern (qmax offset-binary) sets the sign bit of int32 words.
    if 32 % bits == 0:
        assert (pack_rows(q[1:2], bits)[0, : k * bits // 32] == -1).all()


def test_int4_layout_by_hand():
    # offset-binary u = q + 8, element 0 in the lowest nibble, word 1 holds element 8.
    q = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4, 5]], dtype=torch.int32)
    u = [0, 1, 8, 15, 9, 10, 11, 12]
    word0 = sum(v << (4 * i) for i, v in enumerate(u))
    assert word0 == 0xCBA9F810
    packed = pack_rows(q, 4)
    assert packed.tolist() == [[_u32(0xCBA9F810), 13]]


def test_int8_and_int2_layout_by_hand():
    q8 = torch.tensor([[-128, 127, 0, 1]], dtype=torch.int32)
    assert pack_rows(q8, 8).tolist() == [[_u32(0x8180FF00)]]
    q2 = torch.tensor([[-2, -1, 0, 1, 1]], dtype=torch.int32)  # u = 0,1,2,3,3
    assert pack_rows(q2, 2).tolist() == [[0b11_11_10_01_00]]


def test_int3_straddles_word_boundary():
    # element 10 occupies global bits 30, 31 (word 0) and 32 (word 1, bit 0)
    q = torch.full((1, 11), -4, dtype=torch.int32)  # u = 0
    q[0, 10] = 3  # u = 7 = 0b111
    packed = pack_rows(q, 3)
    assert packed.tolist() == [[_u32(0xC0000000), 1]]
    # element 21: bits 63, 64, 65 -> top bit of word 1 and two bits of word 2
    q = torch.full((1, 22), -4, dtype=torch.int32)
    q[0, 21] = -4 + 0b101
    assert pack_rows(q, 3).tolist() == [[0, _u32(0x80000000), 0b10]]
    assert torch.equal(unpack_rows(pack_rows(q, 3), 3, 22), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_cols_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    zp = _rand_codes((37, 3), bits, gen)
    packed = pack_cols(zp, bits)
    assert packed.shape == (packed_words(37, bits), 3)
    assert torch.equal(packed, pack_rows(zp.t(), bits).t())
    assert torch.equal(unpack_cols(packed, bits, 37), zp)


def test_out_of_range_rejected():
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[8]], dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[-9]], dtype=torch.int32), 4)


def test_wrong_word_count_rejected():
    packed = pack_rows(torch.zeros(2, 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        unpack_rows(packed, 4, 17)


def test_large_matrix_is_vectorised():
    # 4096 x 4096 would take minutes with a per-element loop.
    gen = torch.Generator().manual_seed(0)
    q = _rand_codes((1024, 4096), 3, gen)
    assert torch.equal(unpack_rows(pack_rows(q, 3), 3, 4096), q)
