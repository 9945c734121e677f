"""Text or jsonl in, Megatron ``.bin``/``.idx`` out (megatron-core's indexed dataset format).

    python -m fastmoe_megatron.megatron.preprocess_data --input stdlib --output-prefix data/stdlib
    python -m fastmoe_megatron.megatron.preprocess_data --input corpus.jsonl --json-key text \\
        --output-prefix data/corpus --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt

``--input`` is a .jsonl or .json file (JSON lines, as Megatron-LM's preprocessing reads: one
document per line, its text under ``--json-key``, a string or a list of strings that are joined),
a text file (one document), a folder (every .py/.txt/.md/.rst file under it is a document), or
``stdlib``: the Python standard library's own source, present on every machine. Every document
ends with the tokenizer's end-of-document token. ``PREFIX.tokenizer.json`` records the tokenizer
(``pretrain_gpt`` refuses the data with another one). The files appear under their names only
when complete; a failure leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator

import numpy
import torch

from .tokenizer import build_tokenizer

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _lines(path):
    """The lines of the file ``path``, decoded one by one: invalid UTF-8 is an error naming the
    file and line."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n}: not UTF-8 ({exc})") from None


def iter_documents(source: str, json_key: str = "text", limit_bytes: int | None = None) -> Iterator[str]:
    """Documents of ``source`` in a fixed order, up to about ``limit_bytes`` of text."""
    path = stdlib_root() if source == "stdlib" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    seen = 0

    def files():
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.suffix in TEXT_SUFFIXES and p.is_file() and "site-packages" not in p.parts:
                    yield p
        else:
            yield path

    for f in files():
        if f.suffix in (".jsonl", ".json"):
            for n, line in enumerate(_lines(f), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
                    raise ValueError(f"{f}:{n}: not a JSON object with key {json_key!r} "
                                     f"({type(exc).__name__}: {exc})") from None
                if isinstance(doc, list) and all(isinstance(d, str) for d in doc):
                    doc = "".join(doc)  # a document given as its sentences
                if not isinstance(doc, str):
                    raise ValueError(f"{f}:{n}: {json_key!r} is a {type(doc).__name__}, not a "
                                     "string (or a list of strings)")
                seen += len(doc)
                yield doc
                if limit_bytes and seen >= limit_bytes:
                    return
        else:
            doc = f.read_text(encoding="utf-8", errors="replace")
            seen += len(doc)
            yield doc
        if limit_bytes and seen >= limit_bytes:
            return


def tokenizer_record_path(prefix: str) -> str:
    """Where ``preprocess`` records the tokenizer of the dataset ``prefix``."""
    return str(prefix) + ".tokenizer.json"


def preprocess(source: str, output_prefix: str, vocab_file=None, merge_file=None,
               json_key="text", limit_bytes=None, log=print) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    tokenizer = build_tokenizer(vocab_file, merge_file)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = numpy.uint16 if tokenizer.vocab_size < 65500 else numpy.int32
    bin_path, idx_path = get_bin_path(output_prefix), get_idx_path(output_prefix)
    # Temporary names of this process: two processes writing the same dataset (two jobs, or two
    # nodes, sharing a cache) do not write into each other's files.
    me = f"{socket.gethostname()}.{os.getpid()}"
    tmp_bin, tmp_idx = f"{bin_path}.{me}.tmp", f"{idx_path}.{me}.tmp"
    record_path = tokenizer_record_path(output_prefix)
    tmp_record = f"{record_path}.{me}.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    t0, docs, tokens = time.time(), 0, 0
    try:
        for doc in iter_documents(source, json_key, limit_bytes):
            ids = tokenizer.tokenize(doc) + [tokenizer.eod]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            docs += 1
            tokens += len(ids)
            if docs % 200 == 0:
                log(f"preprocess: {docs} documents, {tokens} tokens, {time.time() - t0:.0f} s")
        if docs == 0:
            raise ValueError(f"--input {source}: no documents found")
        builder.finalize(tmp_idx)
        Path(tmp_record).write_text(json.dumps(tokenizer.record(), sort_keys=True) + "\n")
        # The .idx last: a dataset whose .idx is there is complete (the default corpus is
        # checked that way), and an interrupted run leaves nothing under the real names. An
        # older, different .idx goes first, so that a crash between the renames leaves a .bin
        # (and tokenizer record) without an .idx (incomplete), never the new .bin under the old
        # .idx. One equal to the new .idx stays (another process that wrote the same dataset may
        # be reading it).
        old_idx = Path(idx_path)
        if old_idx.is_file() and old_idx.read_bytes() != Path(tmp_idx).read_bytes():
            old_idx.unlink(missing_ok=True)
        Path(tmp_record).replace(record_path)
        Path(tmp_bin).replace(bin_path)
        Path(tmp_idx).replace(idx_path)
    except BaseException:
        builder.data_file.close()
        for p in (tmp_bin, tmp_idx, tmp_record):
            Path(p).unlink(missing_ok=True)
        raise
    log(f"preprocess: wrote {bin_path} and {idx_path}: {docs} documents, {tokens} tokens "
        f"(vocab {tokenizer.vocab_size}) in {time.time() - t0:.1f} s")
    return {"documents": docs, "tokens": tokens, "vocab_size": tokenizer.vocab_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmoe_megatron.megatron.preprocess_data",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a .jsonl or text file, a folder, or 'stdlib'")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.tokenizer.json")
    p.add_argument("--json-key", default="text", help="the text field of each jsonl line")
    p.add_argument("--vocab-file", help="GPT-2 vocab.json (with --merge-file; default: byte-level)")
    p.add_argument("--merge-file", help="GPT-2 merges.txt")
    p.add_argument("--limit-bytes", type=int, help="stop after about this much text")
    a = p.parse_args(argv)
    preprocess(a.input, a.output_prefix, a.vocab_file, a.merge_file, a.json_key, a.limit_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
