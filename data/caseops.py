"""CaseOps ("lossless_caps_caseops_v1"): a lossless case transform of text, and its inverse.

Capital ASCII letters are replaced by lowercase letters plus private-use operator characters, so a
tokenizer can share one set of subwords across case variants. Over each maximal run of ASCII letters:

    all lowercase                  unchanged                        the -> the
    all uppercase, length >= 2     ALLCAPS + run lowercased         NASA -> \\ue002nasa
    first uppercase, rest lower    TITLE + run lowercased           Paris, I -> \\ue001paris, \\ue001i
    any other mix                  TITLE if the first letter is uppercase, the first letter lowercased,
                                   then CAPNEXT before each later uppercase letter, lowercased
                                                                    iPhone -> i\\ue003phone
Any operator character already in the input is written as ESC + that character. Everything else
(digits, spaces, non-ASCII letters such as é or Ω) passes through. `decode` inverts `encode` exactly.

The byte accounting (the validation byte sidecar) follows from the rules: an operator the transform
added stands for no original byte; an escaped literal operator for its 3 UTF-8 bytes; a lowercased
letter for 1 byte, like the letter it replaced. train_gpt.py carries its own copy of `decode` for the
start-up byte check (it imports nothing from data/); tests/test_caseops.py checks the two agree.
"""

from __future__ import annotations

import re

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
RESERVED_V1_SENTINEL = "\ue000"  # the older transform's marker: reserved in the public tokenizer, never emitted
TOKENIZER_SYMBOLS = (RESERVED_V1_SENTINEL, *OPERATORS)  # user-defined pieces of a CaseOps tokenizer
TRANSFORM_NAME = "lossless_caps_caseops_v1"


class CaseOpsError(ValueError):
    """Text that no `encode` output can be: the message names the position and the problem."""


# A letter run holding an uppercase letter (found from its start), or an operator to escape.
_ENCODE_RE = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")


def _encode_match(m: re.Match) -> str:
    run = m.group()
    if run in OPERATORS:
        return ESC + run
    lower = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + lower
    if run[1:].islower() or len(run) == 1:
        return TITLE + lower
    head = (TITLE if run[0].isupper() else "") + lower[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in run[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text`."""
    return _ENCODE_RE.sub(_encode_match, text)


# Each operator with what it applies to; a bare operator (the last branch) is malformed. A tokenizer's
# normalisation (NFKC) may turn a neighbouring character into an ASCII letter (fullwidth Ａ -> A), so
# what precedes an operator is not checked, and ALLCAPS uppercases whatever letters follow.
_DECODE_RE = re.compile(r"\ue004([\ue001-\ue004])|\ue002([a-z][A-Za-z]+)|[\ue001\ue003]([a-z])|[\ue001-\ue004]")


def _decode_match(m: re.Match) -> str:
    literal, caps, letter = m.groups()
    if literal is not None:
        return literal
    if caps is not None:
        return caps.upper()
    if letter is not None:
        return letter.upper()
    names = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}
    follows = m.string[m.end() : m.end() + 1]
    raise CaseOpsError(f"{names[m.group()]} at character {m.start()} is followed by {follows!r}, not "
                       f"{'an operator' if m.group() == ESC else 'a lowercase ASCII letter (two for ALLCAPS)'}")


def decode(text: str) -> str:
    """The original text of CaseOps text; CaseOpsError if `text` is malformed."""
    return _DECODE_RE.sub(_decode_match, text)
