"""CaseOps (``lossless_caps_caseops_v1``): a bijective str -> str transform that moves ASCII case into operators.

Why: a tokenizer that never sees upper-case ASCII letters spends no vocabulary on "The"/"the"/"THE" variants;
case is carried by four private-use operator characters that the tokenizer reserves as single tokens (ids 4-7).
The transform is lossless, so the original text - and therefore its UTF-8 byte count, which bpb divides by -
is recoverable exactly.

Rules (see the data spec), applied to each maximal run of ASCII letters ``[A-Za-z]+``:

- all lowercase: unchanged;
- length >= 2 and all uppercase: ``ALLCAPS`` + lowercase(run);
- first letter uppercase, the rest lowercase and non-empty: ``TITLE`` + lowercase(run);
- anything else: ``TITLE`` if the first letter is uppercase, then the lowercase letters with ``CAPNEXT`` before
  every later uppercase letter ("I" -> TITLE "i", "iPhone" -> "i" CAPNEXT "phone").

A literal operator character in the input is written as ``ESC`` + that character. Everything else (digits,
punctuation, whitespace, non-ASCII letters such as "É" or "ß") passes through unchanged.

Byte accounting: a piece of CaseOps text stands for the original bytes it encodes: operators count 0, an
escaped operator character counts its own UTF-8 length (3), everything else its UTF-8 length (an ASCII letter 1,
whatever its case was). :func:`original_bytes_of_spans` counts all pieces of a whole document at once from
their byte offsets (no Python loop per piece); :func:`utf8_byte_weights` is the same count per byte.
"""

from __future__ import annotations

import re

import numpy as np

TITLE = "\ue001"  # next run: first letter uppercase
ALLCAPS = "\ue002"  # next run: all letters uppercase
CAPNEXT = "\ue003"  # next letter uppercase (inside a run)
ESC = "\ue004"  # next character is a literal operator character
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)

_OPERATOR_RE = re.compile("[\ue001-\ue004]")
_UPPER_RE = re.compile("[A-Z]")
_ASCII_LOWER = "abcdefghijklmnopqrstuvwxyz"
_ASCII_UPPER = _ASCII_LOWER.upper()
# Every uppercase letter X -> CAPNEXT x (for letters that are not the first of their run).
_CAPNEXT_TABLE = str.maketrans({upper: CAPNEXT + lower for upper, lower in zip(_ASCII_UPPER, _ASCII_LOWER)})

# Encoding is two passes so that the regex scans start with a character class, which lets `re` skip ahead in C
# (a look-behind at the front would be tried at every position and run ~3x slower):
# 1. runs that START with an uppercase letter (the look-behind, checked only at capitals, rejects capitals
#    inside a run), whole run -> TITLE / ALLCAPS / TITLE + CAPNEXT form;
# 2. any uppercase letter left is inside a run that starts lowercase ("iPhone"): X -> CAPNEXT x.
_RUN_FROM_CAPITAL_RE = re.compile(r"[A-Z](?<![A-Za-z][A-Z])[A-Za-z]*")
_CAPITAL_TO_RUN_END_RE = re.compile(r"[A-Z][A-Za-z]*")
# Capitalised words repeat a lot ("The", "I", "USA"); bounded memos keep the callbacks at one dict lookup.
_MEMO_MAX_ENTRIES = 1 << 18
_ENCODE_MEMO: dict[str, str] = {}
_DECODE_MEMO: dict[str, str] = {}

# Decoding scans only from operator characters, one alternative per unit:
#   ESC + its operand | TITLE/ALLCAPS at a run start + the rest of the run's letters and case operators |
#   CAPNEXT + the rest of a run that started lowercase | any other (stray) case operator.
_DECODE_UNIT_RE = re.compile(
    "\ue004[\\s\\S]?"
    "|[\ue001\ue002](?<![a-z][\ue001\ue002])[a-z\ue001-\ue003]*"
    "|\ue003[a-z\ue001-\ue003]*"
    "|[\ue001-\ue003]"
)
# Well-formed units (each must match a whole unit).
_TITLE_UNIT_RE = re.compile("\ue001[a-z]+(?:\ue003[a-z]+)*")
_TITLE_ALL_UPPER_RE = re.compile("\ue001[a-z](?:\ue003[a-z])+")  # all caps: that run is encoded with ALLCAPS
_ALLCAPS_UNIT_RE = re.compile("\ue002[a-z]{2,}")
_CAPNEXT_UNIT_RE = re.compile("(?:\ue003[a-z]+)+")

_OPERATOR_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}


class CaseOpsError(ValueError):
    """Text is not a valid CaseOps encoding (a dangling or misplaced operator, or a character encode never emits)."""

    def __init__(self, position: int, reason: str):
        self.position = position
        self.reason = reason
        super().__init__(f"invalid CaseOps text at character {position}: {reason}")


# ------------------------------------------------------------------------------------------------------ encode


def _encode_run_from_capital(run: str) -> str:
    """A maximal ASCII-letter run whose first letter is uppercase -> its CaseOps form."""
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + run.lower()
    rest = run[1:]
    if not rest or rest.islower():
        return TITLE + run.lower()
    return TITLE + run[0].lower() + rest.translate(_CAPNEXT_TABLE)  # mixed case: "McDonald"


def _remember(memo: dict[str, str], key: str, value: str) -> str:
    if len(memo) >= _MEMO_MAX_ENTRIES:
        memo.clear()
    memo[key] = value
    return value


def _encode_run_match(match: re.Match) -> str:
    run = match.group()
    encoded = _ENCODE_MEMO.get(run)
    if encoded is None:
        encoded = _remember(_ENCODE_MEMO, run, _encode_run_from_capital(run))
    return encoded


def _capnext_match(match: re.Match) -> str:
    return match.group().translate(_CAPNEXT_TABLE)


def encode(text: str) -> str:
    """Original text -> CaseOps text. Total: every str has an encoding."""
    if _OPERATOR_RE.search(text) is not None:
        text = _OPERATOR_RE.sub(ESC + r"\g<0>", text)
    text = _RUN_FROM_CAPITAL_RE.sub(_encode_run_match, text)
    if _UPPER_RE.search(text) is not None:
        text = _CAPITAL_TO_RUN_END_RE.sub(_capnext_match, text)
    return text


# ------------------------------------------------------------------------------------------------------ decode


def _unit_error(unit: str, start: int, after_lowercase: bool) -> CaseOpsError:
    """Locate and explain why ``unit`` (at character ``start``) is malformed.

    ``after_lowercase``: the unit continues a run whose earlier letters are lowercase (a CAPNEXT unit).
    """
    for i, char in enumerate(unit):
        previous_is_lower = "a" <= unit[i - 1] <= "z" if i > 0 else after_lowercase
        next_is_lower = i + 1 < len(unit) and "a" <= unit[i + 1] <= "z"
        if char == CAPNEXT:
            if unit[0] == ALLCAPS:
                return CaseOpsError(start + i, "CAPNEXT inside an ALLCAPS run (mixed case starts with TITLE)")
            if not previous_is_lower:
                return CaseOpsError(start + i, "CAPNEXT must follow a lowercase ASCII letter of the same run")
            if not next_is_lower:
                return CaseOpsError(start + i, "CAPNEXT must be followed by a lowercase ASCII letter")
        elif char in (TITLE, ALLCAPS):
            name = _OPERATOR_NAMES[char]
            if i > 0 or after_lowercase:
                return CaseOpsError(start + i, f"{name} inside a letter run (it may only start a run)")
            if not next_is_lower:
                return CaseOpsError(start + i, f"{name} must be followed by a lowercase ASCII letter")
    if unit[0] == ALLCAPS:  # no operator inside, so the run is too short
        return CaseOpsError(start, "ALLCAPS must be followed by a run of at least 2 lowercase letters")
    return CaseOpsError(start, "TITLE with CAPNEXT before every later letter: an all-uppercase run is ALLCAPS")


def _decode_unit(match: re.Match) -> str:
    unit = match.group()
    decoded = _DECODE_MEMO.get(unit)  # holds only TITLE/ALLCAPS units: valid wherever the pattern matches them
    if decoded is not None:
        return decoded
    first = unit[0]
    if first == ESC:
        if len(unit) == 2 and unit[1] in OPERATORS:
            return unit[1]
        if len(unit) == 1:
            raise CaseOpsError(match.start(), "ESC at the end of the text (nothing to escape)")
        raise CaseOpsError(match.start(), f"ESC before {unit[1]!r}, which is not an operator character")
    start = match.start()
    after_lowercase = start > 0 and "a" <= match.string[start - 1] <= "z"
    if first == ALLCAPS:
        if _ALLCAPS_UNIT_RE.fullmatch(unit) and not after_lowercase:
            return _remember(_DECODE_MEMO, unit, unit[1:].upper())
    elif first == TITLE:
        if _TITLE_UNIT_RE.fullmatch(unit) and not _TITLE_ALL_UPPER_RE.fullmatch(unit) and not after_lowercase:
            return _remember(_DECODE_MEMO, unit, _capnext_to_upper(unit[1].upper() + unit[2:]))
    elif after_lowercase and _CAPNEXT_UNIT_RE.fullmatch(unit):
        return _capnext_to_upper(unit)
    raise _unit_error(unit, start, after_lowercase)


def _capnext_to_upper(word: str) -> str:
    """'phone' CAPNEXT 'x' -> 'phoneX' (the word is already validated)."""
    pieces = word.split(CAPNEXT)
    return pieces[0] + "".join(piece[0].upper() + piece[1:] for piece in pieces[1:])


def decode(text: str) -> str:
    """CaseOps text -> original text; the exact inverse of :func:`encode`.

    Only texts that :func:`encode` can produce are accepted, so ``encode(decode(y)) == y`` whenever decode
    succeeds. Anything else raises :class:`CaseOpsError` with the character position and the reason.
    """
    upper = _UPPER_RE.search(text)
    if upper is not None:
        raise CaseOpsError(upper.start(), f"uppercase ASCII letter {upper.group()!r} (CaseOps text never holds A-Z)")
    if _OPERATOR_RE.search(text) is None:
        return text
    return _DECODE_UNIT_RE.sub(_decode_unit, text)


# ---------------------------------------------------------------------------------------------- byte accounting

# UTF-8 of U+E001..U+E004 is EE 80 81..84: three bytes each.
_OPERATOR_UTF8_BYTES = 3


def original_byte_count(surface: str, first_is_escaped: bool = False) -> int:
    """Original UTF-8 bytes that a piece of CaseOps text stands for.

    Operators count 0, an escaped operator character counts 3, anything else its UTF-8 length.
    ``first_is_escaped``: the piece starts with an operator character whose ESC ended the previous piece (the
    published tokenizer splits ESC + TITLE into two tokens, and the second one counts 3 bytes).
    """
    if first_is_escaped:
        if not surface or surface[0] not in OPERATORS:
            raise ValueError(f"first_is_escaped=True but the surface {surface!r} does not start with an operator")
        return original_byte_count(ESC + surface)  # the added ESC counts 0, its operand 3
    total = len(surface.encode("utf-8"))
    if _OPERATOR_RE.search(surface) is None:
        return total
    return total - _OPERATOR_UTF8_BYTES * len(counted_operator_offsets(surface))


def counted_operator_offsets(encoded: str, encoded_utf8: bytes | None = None) -> np.ndarray:
    """UTF-8 byte offsets (int64, ascending) of the operator characters that count 0 original bytes.

    That is every operator character except the operand of an ESC. ``encoded_utf8`` may be passed when the
    caller already holds ``encoded.encode("utf-8")``.
    """
    if _OPERATOR_RE.search(encoded) is None:
        return np.zeros(0, dtype=np.int64)
    data = encoded.encode("utf-8") if encoded_utf8 is None else encoded_utf8
    raw = np.frombuffer(data, dtype=np.uint8)  # [n_bytes]
    # Operators are EE 80 81..84. UTF-8 is self-synchronising, so such a triple starting at a lead byte EE is
    # exactly one operator character: find the EE bytes first (rare), then check the two after each.
    lead = np.flatnonzero(raw[:-2] == 0xEE)
    starts = lead[(raw[lead + 1] == 0x80) & (raw[lead + 2] >= 0x81) & (raw[lead + 2] <= 0x84)].astype(np.int64)
    if ESC not in encoded:
        return starts
    # Drop escaped operands. Pair left to right, so ESC ESC ESC TITLE reads (ESC ESC)(ESC TITLE), as decode
    # reads it; the k-th operator character of the text starts at byte starts[k]. Rare: a loop is fine.
    positions = [match.start() for match in _OPERATOR_RE.finditer(encoded)]
    keep = np.ones(len(starts), dtype=bool)
    k = 0
    while k < len(positions) - 1:
        if encoded[positions[k]] == ESC and positions[k + 1] == positions[k] + 1:
            keep[k + 1] = False
            k += 2
        else:
            k += 1
    return starts[keep]


def original_bytes_of_spans(encoded: str, byte_boundaries: np.ndarray, encoded_utf8: bytes | None = None) -> np.ndarray:
    """Original bytes of consecutive byte spans of a CaseOps document: int64 [n] for boundaries [n + 1].

    Span i is ``utf8[byte_boundaries[i]:byte_boundaries[i + 1]]`` (boundaries ascending, on character starts).
    Its count is its length minus 3 per counted operator inside it, found by binary search - no per-byte or
    per-span Python work, which is what keeps sidecar generation off the critical path.
    """
    byte_boundaries = np.asarray(byte_boundaries, dtype=np.int64)
    lengths = byte_boundaries[1:] - byte_boundaries[:-1]  # [n]
    operators = counted_operator_offsets(encoded, encoded_utf8)
    if len(operators) == 0:
        return lengths
    operators_before = np.searchsorted(operators, byte_boundaries)  # [n + 1]
    return lengths - _OPERATOR_UTF8_BYTES * (operators_before[1:] - operators_before[:-1])


def utf8_byte_weights(encoded: str, encoded_utf8: bytes | None = None) -> np.ndarray:
    """Original bytes per UTF-8 byte of a CaseOps document: int32 [n_bytes], 1 except 0 on counted operators.

    Summing over any whole-character byte span gives that span's original byte count in its context.
    """
    data = encoded.encode("utf-8") if encoded_utf8 is None else encoded_utf8
    weights = np.ones(len(data), dtype=np.int32)  # [n_bytes]
    starts = counted_operator_offsets(encoded, data)
    for offset in range(_OPERATOR_UTF8_BYTES):
        weights[starts + offset] = 0
    return weights
