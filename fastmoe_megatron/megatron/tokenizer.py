"""Tokenizers for ``pretrain_gpt`` that need no download.

Both split text with GPT-2's pre-tokenization pattern (through the ``regex`` package):

- ``ByteLevelTokenizer``: every pre-token becomes its UTF-8 bytes (ids 0-255) and id 256 ends a
  document. The default; the vocabulary is tiny, which suits the CPU quick start.
- ``GPT2BPETokenizer``: GPT-2's byte-level BPE from a ``vocab.json`` and ``merges.txt`` pair (the
  files Megatron-LM's ``--vocab-file`` / ``--merge-file`` take), for real runs.

Each has what megatron-core's ``GPTDataset`` reads (``vocab_size``, ``eod``, ``pad``) plus
``tokenize`` / ``detokenize``, and ``record()``: what a dataset's token ids depend on, which
``preprocess_data`` writes beside the data and ``pretrain_gpt`` compares with its own.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import regex

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbol runs, whitespace.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def pretokenize(text: str) -> list[str]:
    return GPT2_PATTERN.findall(text)


class ByteLevelTokenizer:
    """UTF-8 bytes of GPT-2 pre-tokens; id 256 is the end-of-document token."""

    def __init__(self):
        self.vocab_size = 257
        self.eod = 256
        self.pad = 256
        # GPTDataset names its index cache after these.
        self.unique_identifiers = {"class": "ByteLevelTokenizer", "pattern": GPT2_PATTERN.pattern}

    def record(self) -> dict:
        return {"class": "ByteLevelTokenizer", "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        return [b for piece in pretokenize(text) for b in piece.encode("utf-8")]

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


@lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet of its vocab)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE read from ``vocab.json`` and ``merges.txt``."""

    def __init__(self, vocab_file: str, merges_file: str, eod_token: str = "<|endoftext|>"):
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        self.decoder = {v: k for k, v in self.encoder.items()}
        with open(merges_file, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip() and not ln.startswith("#version")]
        self.ranks = {tuple(ln.split(" ")): i for i, ln in enumerate(lines)}
        if eod_token not in self.encoder:
            raise ValueError(f"{vocab_file} has no {eod_token!r} token")
        self.eod = self.pad = self.encoder[eod_token]
        self.vocab_size = len(self.encoder)
        self.unique_identifiers = {"class": "GPT2BPETokenizer", "vocab_file": str(vocab_file),
                                   "merges_file": str(merges_file)}
        self._byte_map = byte_to_unicode()
        self._unbyte = {c: b for b, c in self._byte_map.items()}
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) < 100_000:
            self._cache[word] = parts
        return parts

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for piece in pretokenize(text):
            mapped = "".join(self._byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[tok] for tok in self._bpe(mapped))
        return ids

    def record(self) -> dict:
        """``files``: a digest of the vocabulary and merges (their contents, not their paths)."""
        merges = sorted(self.ranks, key=self.ranks.get)
        digest = hashlib.sha256(json.dumps([sorted(self.encoder.items()), merges]).encode())
        return {"class": "GPT2BPETokenizer", "vocab_size": self.vocab_size, "eod": self.eod,
                "files": digest.hexdigest()[:12]}

    def detokenize(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self._unbyte[c] for c in text).decode("utf-8", errors="replace")


def build_tokenizer(vocab_file: str | None = None, merge_file: str | None = None):
    """GPT-2 BPE when both files are given, else the byte-level tokenizer."""
    if (vocab_file is None) != (merge_file is None):
        raise ValueError("--vocab-file and --merge-file go together: give both or neither")
    if vocab_file is not None:
        return GPT2BPETokenizer(vocab_file, merge_file)
    return ByteLevelTokenizer()
