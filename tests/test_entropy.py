"""rANS coding of the int8 code matrices (pgolf.artifact.entropy): exact round trips, near-entropy size, damage detection."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.artifact.entropy import (
    ALPHABET,
    PRECISION_BITS,
    CodedMatrices,
    EntropyCodingError,
    column_groups,
    decode_matrices,
    encode_matrices,
    normalize_counts,
)


def _matrices(seed: int = 0) -> list[np.ndarray]:
    """Gaussian-like int6 codes whose spread depends on the column, a 1x1 matrix and one using the whole int8 range."""
    rng = np.random.default_rng(seed)
    spread = rng.exponential(2.0, 33)  # [cols]
    return [
        np.clip(np.round(rng.standard_normal((70, 33)) * spread), -31, 31).astype(np.int8),
        np.array([[5]], dtype=np.int8),
        rng.integers(-128, 128, size=(3, 300)).astype(np.int8),
    ]


@pytest.mark.parametrize("lanes", [1, 7, 64, 1024])
@pytest.mark.parametrize("groups", [1, 4])
def test_round_trip_is_exact(lanes, groups):
    matrices = _matrices()
    coded = encode_matrices(matrices, groups, lanes)
    assert len(coded.states) == lanes and coded.freqs.shape == (len(matrices) * groups, ALPHABET)
    decoded = decode_matrices(coded, [m.shape for m in matrices])
    assert all(np.array_equal(a, b) and b.dtype == np.int8 for a, b in zip(matrices, decoded))


def test_a_constant_matrix_and_no_matrices():
    constant = [np.full((40, 8), -3, dtype=np.int8)]  # one symbol holds the whole table: frequency 2^15
    coded = encode_matrices(constant, 2, 16)
    assert int(coded.freqs.max()) == 1 << PRECISION_BITS
    assert np.array_equal(decode_matrices(coded, [(40, 8)])[0], constant[0])
    empty = encode_matrices([], 4, 8)
    assert decode_matrices(empty, []) == [] and len(empty.words) == 0


def test_encoding_is_deterministic():
    a, b = encode_matrices(_matrices(), 4), encode_matrices(_matrices(), 4)
    for field in ("groups", "freqs", "states", "words"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


def test_normalized_frequencies():
    counts = np.zeros(ALPHABET, dtype=np.int64)
    counts[[0, 5, 9, 200]] = [1, 10_000_000, 3, 50]
    freqs = normalize_counts(counts)
    assert freqs.sum() == 1 << PRECISION_BITS
    assert (freqs[counts > 0] >= 1).all() and (freqs[counts == 0] == 0).all()
    assert freqs[5] == freqs.max()
    many = np.ones(ALPHABET, dtype=np.int64)  # every symbol once: 2^15 / 256 each
    assert (normalize_counts(many) == (1 << PRECISION_BITS) // ALPHABET).all()
    assert normalize_counts(np.zeros(ALPHABET, dtype=np.int64)).sum() == 0


def test_column_classes_follow_the_spread():
    rng = np.random.default_rng(1)
    codes = (rng.standard_normal((200, 8)) * np.arange(1, 9)).round().clip(-31, 31).astype(np.int8)  # spread grows
    assert list(column_groups(codes, 4)) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_size_is_close_to_the_conditional_entropy():
    """The coded words cost at most 0.5 % over the empirical entropy given the column class (large sample)."""
    rng = np.random.default_rng(2)
    rows, cols = 4096, 64
    codes = np.clip(np.round(rng.standard_normal((rows, cols)) * np.linspace(1, 8, cols)), -31, 31).astype(np.int8)
    coded = encode_matrices([codes], 4, 256)
    groups = column_groups(codes, 4)
    entropy_bits = 0.0
    for g in range(4):
        _, counts = np.unique(codes[:, groups == g], return_counts=True)
        entropy_bits -= float((counts * np.log2(counts / counts.sum())).sum())
    coded_bits = 16 * len(coded.words) + 32 * len(coded.states)
    assert entropy_bits < coded_bits < 1.005 * entropy_bits + 32 * 256


def test_damage_is_detected():
    matrices = _matrices()
    shapes = [m.shape for m in matrices]
    coded = encode_matrices(matrices, 4, 64)

    def with_(**changes):
        fields = {f: getattr(coded, f) for f in ("num_groups", "groups", "freqs", "states", "words")}
        fields.update(changes)
        return CodedMatrices(**fields)

    with pytest.raises(EntropyCodingError, match="ends early|initial state"):
        decode_matrices(with_(words=coded.words[:-3]), shapes)
    flipped = coded.words.copy()
    flipped[len(flipped) // 3] ^= 0x1234
    with pytest.raises(EntropyCodingError, match="initial state|does not have|ends early"):
        decode_matrices(with_(words=flipped), shapes)
    with pytest.raises(EntropyCodingError, match="lane states"):
        decode_matrices(with_(states=np.zeros(64, dtype=np.uint32)), shapes)
    bad_freqs = coded.freqs.copy()
    bad_freqs[0, 128] += 1
    with pytest.raises(EntropyCodingError, match="sum to 2"):
        decode_matrices(with_(freqs=bad_freqs), shapes)
    with pytest.raises(EntropyCodingError, match="column classes"):
        decode_matrices(with_(groups=coded.groups[:-1]), shapes)
    with pytest.raises(ValueError, match="2-D int8"):
        encode_matrices([np.zeros((2, 2), dtype=np.int16)])
