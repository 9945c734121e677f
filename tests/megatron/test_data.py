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


@pytest.mark.parametrize("start,global_batch,dp", [(0, 4, 2), (6, 4, 2), (6, 2, 1), (5, 6, 3)])
def test_batch_iterator_reads_the_next_samples_from_the_start_sample(start, global_batch, dp):
    """Every iteration reads the next global batch of samples from start_sample on, each data-
    parallel rank its contiguous share in microbatches of 2: together the ranks read every
    sample once, in order, whatever the global batch size of the run that consumed the first
    start_sample samples."""
    import torch

    from fastmoe_megatron.megatron.data import BatchIterator

    dataset = [{"i": torch.tensor(i)} for i in range(40)]
    per_rank = global_batch // dp
    iters = 3
    seen = []  # one iteration, over all ranks
    for r in range(dp):
        batches = BatchIterator(dataset, global_batch, 2, r, dp, start_sample=start)
        for _ in range(per_rank // 2):
            seen += next(batches)["i"].tolist()
    assert seen == list(range(start, start + global_batch))
    # Several iterations on one rank: the rank's shares of consecutive global batches.
    batches = BatchIterator(dataset, global_batch, 2, dp - 1, dp, start_sample=start)
    rows = [v for _ in range(iters * per_rank // 2) for v in next(batches)["i"].tolist()]
    want = [start + it * global_batch + (dp - 1) * per_rank + j
            for it in range(iters) for j in range(per_rank)]
    assert rows == want
