"""Tokenizers and preprocess_data: round trips, GPT-2 BPE from vocab/merges files, and .bin/.idx
files that megatron-core's IndexedDataset reads back."""
import json

import numpy as np
import pytest

from fastmoe_megatron.megatron.tokenizer import (ByteLevelTokenizer, GPT2BPETokenizer,
                                                 build_tokenizer, byte_to_unicode, pretokenize)

TEXT = "def f(x):\n    return x's  value + 42  # ünïcode ✓\n"


def test_pretokenize_follows_gpt2_pattern():
    assert pretokenize("Hello world's 42 times!!") == ["Hello", " world", "'s", " 42", " times", "!!"]
    assert "".join(pretokenize(TEXT)) == TEXT


def test_byte_level_round_trip():
    tok = ByteLevelTokenizer()
    ids = tok.tokenize(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.detokenize(ids + [tok.eod]) == TEXT
    assert tok.vocab_size == 257 and tok.eod == 256


def _tiny_gpt2_files(tmp_path):
    """A hand-made GPT-2 style vocabulary: all 256 byte symbols plus three merges."""
    b2u = byte_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    merges = [("Ġ", "w"), ("Ġw", "o"), ("r", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
    return vocab, str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_gpt2_bpe_merges_in_rank_order_and_round_trips(tmp_path):
    vocab, vf, mf = _tiny_gpt2_files(tmp_path)
    tok = build_tokenizer(vf, mf)
    assert isinstance(tok, GPT2BPETokenizer)
    ids = tok.tokenize(" wore")
    # " wore" -> Ġ w o r e -> Ġw o r e -> Ġwo r e -> Ġwo re
    assert ids == [vocab["Ġwo"], vocab["re"]]
    assert tok.detokenize(tok.tokenize(TEXT)) == TEXT
    assert tok.eod == vocab["<|endoftext|>"] and tok.vocab_size == len(vocab)


def test_vocab_and_merges_go_together(tmp_path):
    _, vf, _ = _tiny_gpt2_files(tmp_path)
    with pytest.raises(ValueError, match="--merge-file"):
        build_tokenizer(vf, None)


def test_preprocess_writes_a_dataset_megatron_reads(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from fastmoe_megatron.megatron.preprocess_data import main

    docs = ["first document", "second one, ✓", "third"]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    prefix = tmp_path / "out" / "docs"
    assert main(["--input", str(src), "--output-prefix", str(prefix)]) == 0
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(docs)
    tok = ByteLevelTokenizer()
    for i, d in enumerate(docs):
        assert list(np.asarray(ds[i])) == tok.tokenize(d) + [tok.eod]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        main(["--input", str(bad), "--output-prefix", str(tmp_path / "bad")])
