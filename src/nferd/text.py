"""Counts in messages: "1 image", "2 images" (a module of its own so that every layer can say them)."""

from __future__ import annotations


def plural(n: int, word: str) -> str:
    """``word`` for one, ``word + "s"`` (or "ies" after a consonant and y) otherwise."""
    if n == 1:
        return word
    return word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + "s"


def count(n: int, word: str) -> str:
    """``"1 image"``, ``"3 images"``."""
    return f"{n} {plural(n, word)}"
