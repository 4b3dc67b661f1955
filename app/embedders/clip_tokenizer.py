"""CLIP's byte-level BPE tokenizer without torch, so the ONNX text tower can serve text search in a torch-free server.

The algorithm is OpenAI CLIP's ``simple_tokenizer.py`` (MIT License, Copyright (c) 2021 OpenAI), which open_clip
uses as ``SimpleTokenizer`` with ``clean='lower'``: ftfy + HTML unescaping, whitespace folded, lower case; the text
split by CLIP's regular expression; each piece's UTF-8 bytes mapped to printable characters; BPE merges applied in
rank order with ``</w>`` marking the end of a word; ``<start_of_text>`` ... ``<end_of_text>``, truncated to the
context length with the end token kept, zero-padded. The merges file is open_clip's
``bpe_simple_vocab_16e6.txt.gz``, copied next to the exported graph. The export compares this tokenizer's ids with
open_clip's on a set of texts and refuses to serve text from ONNX if one differs.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

VOCAB_MERGES = 49152 - 256 - 2
"""Merges CLIP uses from the file: its vocabulary is 256 byte symbols x 2 (with and without ``</w>``), these merges
and 2 special tokens, 49,408 ids in all."""

START, END = "<start_of_text>", "<end_of_text>"


@lru_cache(maxsize=1)
def _byte_symbols() -> dict[int, str]:
    """Each byte value -> one printable character: printable Latin-1 bytes map to themselves, the other 68 bytes to
    code points from 256 up, so no symbol is whitespace or a control character."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ClipTokenizer:
    """Texts -> ``(N, context_length)`` int64 token ids, as open_clip's ``SimpleTokenizer`` (``clean='lower'``).

    Args:
        merges_path: the gzip-compressed merges file (``bpe_simple_vocab_16e6.txt.gz``).
        context_length: tokens per text, start and end tokens included (77 for CLIP).

    Raises:
        OSError: the merges file cannot be read.
    """

    _PATTERN = regex.compile(
        START + "|" + END + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
    )

    def __init__(self, merges_path: str | Path, context_length: int = 77) -> None:
        lines = gzip.open(merges_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : VOCAB_MERGES + 1]]
        symbols = list(_byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.context_length = int(context_length)
        self._cache: dict[str, list[str]] = {START: [START], END: [END]}

    def _bpe(self, piece: str) -> list[str]:
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            # The adjacent pair with the lowest merge rank is merged everywhere it occurs, then again, until no
            # pair of the word is a known merge.
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """The token ids of one text, without start and end tokens and without truncation."""
        text = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).lower()
        table = _byte_symbols()
        ids: list[int] = []
        for piece in self._PATTERN.findall(text):
            ids.extend(self.ids[t] for t in self._bpe("".join(table[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), context_length)`` int64: start, the text's tokens (cut so the end token fits), end, zeros."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        start, end = self.ids[START], self.ids[END]
        for row, text in enumerate(texts):
            tokens = [start, *self.encode(text), end]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = end
            out[row, : len(tokens)] = tokens
        return out
