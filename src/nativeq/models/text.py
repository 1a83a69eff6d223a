"""Characters ⇄ token ids for the CTC head, and transcript normalization.

The vocabulary is a blank (id 0), a space, the 26 lower-case letters and the apostrophe.
Transcripts are lower-case words with numbers spelled out ("room 42" -> "room forty two");
anything else is a user error naming the offending character.
"""

from __future__ import annotations

import re

from nativeq.errors import NativeqError

BLANK = "<blank>"
CHARS = " abcdefghijklmnopqrstuvwxyz'"
VOCAB: tuple[str, ...] = (BLANK, *CHARS)
VOCAB_SIZE = len(VOCAB)
_INDEX = {c: i for i, c in enumerate(VOCAB)}

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """Spell out 0 <= n < 10**9 the way people read it ("one hundred five")."""
    if n < 0 or n >= 10**9:
        raise NativeqError(f"number {n} is out of the spelled-out range 0..999999999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            head, rest = divmod(n, size)
            words = number_to_words(head) + " " + name
            return words if rest == 0 else words + " " + number_to_words(rest)
    raise AssertionError("unreachable")


def normalize_text(text: str, where: str = "transcript") -> str:
    """Lower-case, spell out digit runs, unify quotes, squeeze spaces; refuse other characters."""
    text = text.lower().replace("\u2019", "'").replace("-", " ")
    text = re.sub(r"[.,!?;:\"]", " ", text)
    text = re.sub(r"\d+", lambda m: " " + number_to_words(int(m.group())) + " ", text)
    text = " ".join(text.split())
    if not text:
        raise NativeqError(f"{where}: empty transcript")
    bad = sorted({c for c in text if c not in _INDEX or c == BLANK})
    if bad:
        raise NativeqError(f"{where}: character(s) {''.join(bad)!r} are outside the vocabulary {CHARS!r}")
    return text


def encode(text: str, where: str = "transcript") -> list[int]:
    """Token ids of an already-normalized transcript (raises on characters outside VOCAB)."""
    if not text:
        raise NativeqError(f"{where}: empty transcript")
    try:
        return [_INDEX[c] for c in text]
    except KeyError as e:
        raise NativeqError(f"{where}: character {e.args[0]!r} is outside the vocabulary {CHARS!r}") from None


def decode(ids) -> str:
    """Characters of a sequence of token ids (blanks dropped, no CTC collapsing)."""
    return "".join(VOCAB[i] for i in ids if i != 0)


def ctc_greedy_collapse(ids) -> list[int]:
    """Collapse repeats, then drop blanks: the CTC best-path rule."""
    out, prev = [], None
    for i in ids:
        i = int(i)
        if i != prev and i != 0:
            out.append(i)
        prev = i
    return out
