"""An offline ``CLIPTokenizer`` whose vocabulary holds each toy caption word as one token.

The vocabulary is CLIP's byte-level alphabet (every byte alone and as a word end, so any text still
tokenizes) plus the tokens built by BPE merges that assemble each toy word from its characters. Each
word's merges are added after all earlier ones, always joining its first two pieces; a later merge
then never changes how an earlier word is split (BPE applies the lowest-ranked merge present, and
an earlier word always has one of its own), so every word becomes exactly one token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import CLIPTokenizer

from flow_lune.tiny import byte_level_vocab

from .world import ATTRIBUTES

CAPTION_WORDS = ("a", "at", "the", *(v for values in ATTRIBUTES.values() for v in values))


def _apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if (a, b) in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def word_merges(words: tuple[str, ...] = CAPTION_WORDS) -> list[tuple[str, str]]:
    """BPE merges, in rank order, that turn each of ``words`` into one token."""
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word.isascii() or not word.isalpha() or not word.islower():
            raise ValueError(f"toy words must be lower-case ASCII letters, got {word!r}.")
        symbols = _apply([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            symbols = _apply(symbols, ranks)
    return sorted(ranks, key=ranks.get)


def write_toy_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (byte-level alphabet + one token per toy word) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_vocab()
    merges = word_merges()
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def toy_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    """The toy ``CLIPTokenizer`` from ``folder``'s ``vocab.json``/``merges.txt``; 77 tokens, as SD1.5."""
    folder = Path(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
