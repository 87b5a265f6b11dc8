"""CaseOps: the published golden vectors, round trips, malformed input, byte accounting, the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datafiles import CASEOPS_VECTORS

from pgolf.data import caseops
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_PATH = CASEOPS_VECTORS

# Letters of both cases (ASCII and not), digits, whitespace of several kinds, punctuation that sits inside
# words, the operators themselves and their private-use neighbour U+E000.
RICH_ALPHABET = (
    list("aAbBiIxXyYzZ")
    + list("09 \t\n\r.'-_/")
    + ["é", "É", "ß", "Ω", "ω", "ﬁ", "\u0301", "😀", "\xa0", "\ue000", "\ue005"]
    + list(caseops.OPERATORS)
)


def load_vectors() -> list[dict]:
    return [json.loads(line) for line in VECTORS_PATH.read_text(encoding="utf-8").splitlines()]


def random_strings(seed: int, count: int, alphabet: list[str], max_length: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_length))) for _ in range(count)]


# ------------------------------------------------------------------------------------------------ vectors


def test_conformance_vectors_encode_and_decode():
    vectors = load_vectors()
    assert len(vectors) >= 40
    for vector in vectors:
        assert caseops.encode(vector["text"]) == vector["encoded"], vector["text"]
        assert caseops.decode(vector["encoded"]) == vector["text"], vector["text"]


def test_conformance_vectors_piece_byte_counts():
    """Each published piece's byte count from its surface; an operand whose ESC ended the previous piece counts 3."""
    for vector in load_vectors():
        text_so_far = ""
        for surface, expected in zip(vector["piece_surfaces"], vector["original_bytes"]):
            # The previous pieces end in an unpaired ESC exactly when the next character is its operand.
            first_is_escaped = bool(surface) and _ends_with_open_escape(text_so_far)
            assert caseops.original_byte_count(surface, first_is_escaped) == expected, (vector["text"], surface)
            text_so_far += surface


def _ends_with_open_escape(text: str) -> bool:
    trailing_escs = len(text) - len(text.rstrip(ESC))
    return trailing_escs % 2 == 1


# ------------------------------------------------------------------------------------------------- encode


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the", "the"),
        ("The", TITLE + "the"),
        ("THE", ALLCAPS + "the"),
        ("I", TITLE + "i"),
        ("iPhone", "i" + CAPNEXT + "phone"),
        ("OpenAI", TITLE + "open" + CAPNEXT + "a" + CAPNEXT + "i"),
        ("aBC", "a" + CAPNEXT + "b" + CAPNEXT + "c"),
        ("ABc", TITLE + "a" + CAPNEXT + "bc"),
        ("ÉCOLE", "É" + ALLCAPS + "cole"),  # É is not ASCII: it ends no run and is never transformed
        ("x" + TITLE + "Y", "x" + ESC + TITLE + TITLE + "y"),
        (ESC, ESC + ESC),
        ("", ""),
    ],
)
def test_encode_examples(text, expected):
    assert caseops.encode(text) == expected
    assert caseops.decode(expected) == text


def test_encode_never_emits_uppercase_ascii_and_decode_inverts_it():
    for text in random_strings(seed=1, count=20_000, alphabet=RICH_ALPHABET, max_length=16):
        encoded = caseops.encode(text)
        assert not any("A" <= char <= "Z" for char in encoded), text
        assert caseops.decode(encoded) == text, (text, encoded)


def test_long_runs_and_memo_bound(monkeypatch):
    """Results do not depend on the memo, also when it overflows and is cleared."""
    monkeypatch.setattr(caseops, "_MEMO_MAX_ENTRIES", 4)
    caseops._ENCODE_MEMO.clear()
    words = [f"W{'x' * i}Y" for i in range(50)] + ["A" * 10_000, "a" * 10_000 + "B"]
    for word in words * 2:
        encoded = caseops.encode(word)
        assert caseops.decode(encoded) == word
        assert len(caseops._ENCODE_MEMO) <= 4
    assert caseops.encode("A" * 10_000) == ALLCAPS + "a" * 10_000
    caseops._ENCODE_MEMO.clear()


# ------------------------------------------------------------------------------------------------- decode


def test_decode_accepts_exactly_the_encodings():
    """Random operator soup: whatever decode accepts re-encodes to itself; the rest raises CaseOpsError."""
    alphabet = list("abxy .é-") + list(caseops.OPERATORS)
    accepted = rejected = 0
    for text in random_strings(seed=2, count=30_000, alphabet=alphabet, max_length=8):
        try:
            decoded = caseops.decode(text)
        except CaseOpsError as exc:
            assert 0 <= exc.position < len(text)
            assert text[exc.position] in caseops.OPERATORS, (text, exc)
            rejected += 1
            continue
        assert caseops.encode(decoded) == text, (text, decoded)
        accepted += 1
    assert accepted > 1000 and rejected > 1000


@pytest.mark.parametrize(
    "text, position, reason",
    [
        ("ab" + TITLE, 2, "TITLE inside a letter run"),
        (TITLE, 0, "TITLE must be followed by a lowercase ASCII letter"),
        (TITLE + " x", 0, "TITLE must be followed by a lowercase ASCII letter"),
        (TITLE + "é", 0, "TITLE must be followed by a lowercase ASCII letter"),
        ("x " + ALLCAPS + "a", 2, "at least 2 lowercase letters"),
        (ALLCAPS + "ab" + CAPNEXT + "c", 3, "CAPNEXT inside an ALLCAPS run"),  # would mix ALLCAPS and CAPNEXT
        (ALLCAPS + ALLCAPS + "ab", 0, "ALLCAPS must be followed by a lowercase ASCII letter"),
        (TITLE + "a" + CAPNEXT + "b", 0, "all-uppercase run is ALLCAPS"),  # "AB" encodes as ALLCAPS ab
        (TITLE + "ab" + TITLE + "c", 3, "TITLE inside a letter run"),
        ("ab" + CAPNEXT, 2, "CAPNEXT must be followed by a lowercase ASCII letter"),
        ("hello " + CAPNEXT + "x", 6, "CAPNEXT must follow a lowercase ASCII letter"),
        (CAPNEXT, 0, "CAPNEXT must follow"),
        ("abc" + ESC, 3, "ESC at the end"),
        (ESC + "a", 0, "ESC before 'a'"),
        ("Abc", 0, "uppercase ASCII letter 'A'"),
        ("x" + TITLE + "y", 1, "TITLE inside a letter run"),
    ],
)
def test_decode_rejects_malformed(text, position, reason):
    with pytest.raises(CaseOpsError) as info:
        caseops.decode(text)
    assert info.value.position == position, str(info.value)
    assert reason in info.value.reason
    assert f"at character {position}" in str(info.value)
    assert isinstance(info.value, ValueError)


# -------------------------------------------------------------------------------------------- byte counts


def test_whole_document_weights_sum_to_original_utf8_length():
    for text in random_strings(seed=3, count=5_000, alphabet=RICH_ALPHABET, max_length=24):
        encoded = caseops.encode(text)
        weights = caseops.utf8_byte_weights(encoded)
        assert weights.shape == (len(encoded.encode("utf-8")),)
        assert int(weights.sum()) == len(text.encode("utf-8")), (text, encoded)
        assert caseops.original_byte_count(encoded) == len(text.encode("utf-8"))


def test_span_counts_match_per_byte_weights():
    """The binary-search span path equals a cumulative sum of per-byte weights, for any whole-character cut."""
    rng = random.Random(4)
    for text in random_strings(seed=5, count=3_000, alphabet=RICH_ALPHABET, max_length=24):
        encoded = caseops.encode(text)
        data = encoded.encode("utf-8")
        char_starts = np.cumsum([0] + [len(char.encode("utf-8")) for char in encoded])  # [n_chars + 1]
        cuts = sorted({0, len(data), *rng.sample(char_starts.tolist(), k=min(4, len(char_starts)))})
        cumulative = np.concatenate([[0], np.cumsum(caseops.utf8_byte_weights(encoded))])
        expected = cumulative[cuts[1:]] - cumulative[cuts[:-1]]
        got = caseops.original_bytes_of_spans(encoded, np.array(cuts), data)
        assert got.tolist() == expected.tolist(), (encoded, cuts)


@pytest.mark.parametrize(
    "surface, first_is_escaped, expected",
    [
        ("Hello", False, 5),
        (TITLE + "hello", False, 5),
        (ESC + TITLE, False, 3),
        (TITLE, True, 3),  # the operand of an ESC that ended the previous piece
        (ESC, True, 3),  # an escaped ESC
        (ESC + ESC + ESC + TITLE, False, 6),  # (ESC ESC)(ESC TITLE): two literal operators
        ("é😀", False, 6),
        ("", False, 0),
    ],
)
def test_original_byte_count(surface, first_is_escaped, expected):
    assert caseops.original_byte_count(surface, first_is_escaped) == expected


def test_original_byte_count_rejects_inconsistent_escape_flag():
    with pytest.raises(ValueError, match="does not start with an operator"):
        caseops.original_byte_count("abc", first_is_escaped=True)


# ---------------------------------------------------------------------------------------------------- CLI


def run_cli(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    # A non-UTF-8 stdio encoding: the command must still read and write UTF-8 bytes.
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    return subprocess.run(
        [sys.executable, "-m", "pgolf", *args],
        input=stdin.encode("utf-8"),
        capture_output=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
    )


def test_cli_round_trip_utf8():
    text = "Hello WORLD, iPhone naïve ÉCOLE 😀 literal \ue001 and \ue004\n\tTabs  and CRLF\r\nend"
    encoded = run_cli(["caseops", "encode"], text)
    assert encoded.returncode == 0, encoded.stderr.decode()
    assert encoded.stdout.decode("utf-8") == caseops.encode(text)
    decoded = run_cli(["caseops", "decode"], encoded.stdout.decode("utf-8"))
    assert decoded.returncode == 0, decoded.stderr.decode()
    assert decoded.stdout.decode("utf-8") == text


def test_cli_decode_malformed_fails_with_position():
    result = run_cli(["caseops", "decode"], "ok " + CAPNEXT)
    assert result.returncode != 0
    assert "at character 3" in result.stderr.decode("utf-8")
