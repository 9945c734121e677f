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


def test_later_passes_over_the_data_are_seeded_permutations():
    """Samples past the dataset's end read it again in an order drawn from the seed and the
    pass, not in the first pass's order; the order is a function of the sample position alone,
    so an iterator started anywhere reads what a run that got there would."""
    import torch

    from fastmoe_megatron.megatron.data import BatchIterator

    dataset = [{"i": torch.tensor(i)} for i in range(10)]

    def read(n, seed=3, start=0):
        batches = BatchIterator(dataset, 4, 2, 0, 1, start_sample=start, seed=seed)
        return [v for _ in range(n // 2) for v in next(batches)["i"].tolist()]

    rows = read(40)
    passes = [rows[i:i + 10] for i in range(0, 40, 10)]
    assert passes[0] == list(range(10))
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4  # every pass in its own order
    assert read(40, seed=4)[10:] != rows[10:] and read(40, seed=4)[:10] == rows[:10]
    assert read(20, start=16) == rows[16:36]


def test_token_ids_beyond_the_vocabulary_are_a_data_error():
    """Data made with a larger vocabulary (and no tokenizer record) used to end in the
    embedding's IndexError (on a GPU a device-side assert; under TP the ids were silently
    zeroed): it is an error naming the data and the tokenizer flags when read."""
    import torch

    from fastmoe_megatron.megatron.data import BatchIterator, DataConfigError

    dataset = [{"tokens": torch.tensor([1, 2, 3]), "labels": torch.tensor([2, 3, 4])},
               {"tokens": torch.tensor([5, 300, 6]), "labels": torch.tensor([300, 6, 7])}]
    assert next(BatchIterator(dataset, 1, 1, 0, 1, vocab_size=257, source="d"))["tokens"].tolist() \
        == [[1, 2, 3]]
    with pytest.raises(DataConfigError, match=r"--data-path d: item 1 holds token id 300, beyond "
                                              r"this run's vocabulary of 257: .*--vocab-file"):
        next(BatchIterator(dataset, 2, 2, 0, 1, vocab_size=257, source="d"))


def test_data_made_with_another_tokenizer_is_refused(tmp_path):
    """preprocess_data records its tokenizer; a run with another one is refused before it
    trains (byte-level data read with GPT-2 BPE trained on without a word: the ids were in
    range, but meant other tokens and the end of document was another id)."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    import os

    from fastmoe_megatron.megatron.data import DataConfigError, build_datasets
    from fastmoe_megatron.megatron.preprocess_data import preprocess

    _, vf, mf = _tiny_gpt2_files(tmp_path)
    byte_level = _dataset(tmp_path, [f"document {i} " * 20 for i in range(4)])
    bpe = str(tmp_path / "bpe" / "corpus")
    preprocess(str(tmp_path / "docs.jsonl"), bpe, vf, mf, log=lambda m: None)
    other_vocab = dict(json.loads(open(vf).read()), extra=999)
    (tmp_path / "v2.json").write_text(json.dumps(other_vocab))
    runs = {"bytes": ByteLevelTokenizer(), "bpe": build_tokenizer(vf, mf),
            "bpe2": build_tokenizer(str(tmp_path / "v2.json"), mf)}
    for data, ok in ((byte_level, "bytes"), (bpe, "bpe")):
        for name, tok in runs.items():
            if name == ok:
                assert build_datasets(data, tok, 16, 1, "100,0,0", [None, 0, 0])[0] is not None
                continue
            with pytest.raises(DataConfigError, match=rf"--data-path {data} was tokenized with "
                                                      r".*this run's tokenizer is .*--vocab-file"):
                build_datasets(data, tok, 16, 1, "100,0,0", [None, 0, 0])
    os.unlink(bpe + ".tokenizer.json")  # data made elsewhere: checked as it is read instead
    assert build_datasets(bpe, runs["bytes"], 16, 1, "100,0,0", [None, 0, 0])[0] is not None


def test_a_bin_that_does_not_match_its_idx_is_refused(tmp_path):
    """A truncated .bin passed start-up and failed with numpy's "buffer is smaller than
    requested size" at the first sample past its end, wherever the shuffle put it."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from fastmoe_megatron.megatron.data import DataConfigError, build_datasets

    prefix = _dataset(tmp_path, [f"document {i} " * 20 for i in range(4)])
    size = len(open(prefix + ".bin", "rb").read())
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 64)
    with pytest.raises(DataConfigError, match=rf"--data-path {prefix}: {prefix}\.bin holds "
                                              rf"{size - 64} bytes, but its \.idx describes {size}"):
        build_datasets(prefix, ByteLevelTokenizer(), 16, 1, "100,0,0", [None, 0, 0])


@pytest.mark.parametrize("line,why", [
    ('["a"]', "not a JSON object"), ('"abc"', "not a JSON object"), ('{"text": null}', "NoneType"),
    ('{"text": 5}', "is a int"), ('{"text": "ok"', "not a JSON object"),
    (b'{"text": "\xff\xfe"}', "not UTF-8"),
])
def test_preprocess_names_the_bad_line_and_leaves_nothing(tmp_path, line, why):
    from fastmoe_megatron.megatron.preprocess_data import preprocess

    src = tmp_path / "docs.json"  # .json is read as JSON lines, as Megatron-LM reads it
    good = b'{"text": "fine"}\n'
    src.write_bytes(good + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(ValueError, match=f"docs.json:2: .*{why}"):
        preprocess(str(src), str(tmp_path / "out" / "d"), log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_crash_between_the_renames_leaves_no_mismatched_dataset(tmp_path, monkeypatch):
    """Re-preprocessing over an existing dataset, killed after the new .bin is in place but
    before its .idx: what is left is a .bin without an .idx (incomplete, and made again by the
    default-corpus check), not the new .bin under the old .idx. The same dataset written again
    (two jobs making one corpus) keeps its .idx, which the other job may be reading."""
    from pathlib import Path

    from fastmoe_megatron.megatron.preprocess_data import preprocess

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "the old corpus, which is longer"}) + "\n")
    out = tmp_path / "out"
    preprocess(str(src), str(out / "d"), log=lambda m: None)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(files) == ["d.bin", "d.idx", "d.tokenizer.json"]
    real_replace = Path.replace

    def replace(self, target):
        if str(target).endswith(".idx"):
            raise KeyboardInterrupt  # the job is killed between the two renames
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        preprocess(str(src), str(out / "d"), log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    src.write_text(json.dumps({"text": "new"}) + "\n")
    with pytest.raises(KeyboardInterrupt):
        preprocess(str(src), str(out / "d"), log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["d.bin", "d.tokenizer.json"]


def test_preprocess_reads_json_lines_and_sentence_lists(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from fastmoe_megatron.megatron.preprocess_data import preprocess

    src = tmp_path / "docs.json"
    src.write_text(json.dumps({"text": "one", "id": 1}) + "\n"
                   + json.dumps({"text": ["two ", "sentences"]}) + "\n")
    assert preprocess(str(src), str(tmp_path / "d"), log=lambda m: None)["documents"] == 2
    tok = ByteLevelTokenizer()
    ds = IndexedDataset(str(tmp_path / "d"))
    assert [list(np.asarray(ds[i])) for i in range(2)] == [
        tok.tokenize("one") + [tok.eod], tok.tokenize("two sentences") + [tok.eod]]


def test_two_processes_preprocessing_the_same_dataset(tmp_path):
    """Two jobs sharing a cache make the same default corpus at once: both finish (they used to
    write the same temporary file, and the second rename failed)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = ("from fastmoe_megatron.megatron.preprocess_data import preprocess; "
            f"preprocess('stdlib', {str(tmp_path / 'c' / 'd')!r}, limit_bytes=400000, log=print)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "d.bin", "d.idx", "d.tokenizer.json"]


def test_default_corpus_uses_the_bpe_files(tmp_path):
    """With --vocab-file/--merge-file the default corpus is tokenized with them (it was written
    byte-level), under a name that depends on their contents."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from fastmoe_megatron.megatron.data import default_data_prefix
    from fastmoe_megatron.megatron.preprocess_data import iter_documents

    _, vf, mf = _tiny_gpt2_files(tmp_path)
    prefix = default_data_prefix(tmp_path / "cache", 20000, vf, mf)
    assert prefix != default_data_prefix(tmp_path / "cache", 20000)
    tok = build_tokenizer(vf, mf)
    first = next(iter_documents("stdlib", limit_bytes=20000))
    ds = IndexedDataset(prefix)  # kept alive: its arrays are views of its memory map
    assert list(np.asarray(ds[0])) == tok.tokenize(first) + [tok.eod]


def _dataset(tmp_path, docs):
    from fastmoe_megatron.megatron.preprocess_data import preprocess

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess(str(src), str(tmp_path / "data" / "corpus"), log=lambda m: None)
    return str(tmp_path / "data" / "corpus")


@pytest.mark.timeout(120)
def test_unread_splits_are_not_built(tmp_path):
    """--split 969,30,1 over 40 documents leaves the test split none; megatron-core's
    GPTDataset looped forever building it although nothing reads it."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from fastmoe_megatron.megatron.data import build_datasets

    prefix = _dataset(tmp_path, [f"document {i} " * 20 for i in range(40)])
    train, valid, test = build_datasets(prefix, ByteLevelTokenizer(), 32, 1, "969,30,1",
                                        [50, 0, 0])
    assert len(train) >= 50 and valid is None and test is None


@pytest.mark.timeout(120)
def test_a_train_split_without_documents_is_an_error(tmp_path):
    """--split 1,99,0 over 3 documents leaves the train split none: megatron-core looped forever
    (no output) building it. It is an error naming --split."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from fastmoe_megatron.megatron.data import DataConfigError, build_datasets

    prefix = _dataset(tmp_path, [f"document {i} " * 20 for i in range(3)])
    with pytest.raises(DataConfigError, match=r"--split 1,99,0: the train split .* holds 0 "
                                              r"tokens \(0 of its 3 documents\), fewer than one"):
        build_datasets(prefix, ByteLevelTokenizer(), 32, 1, "1,99,0", [50, 0, 0])
    train, _, _ = build_datasets(prefix, ByteLevelTokenizer(), 32, 1, "34,66,0", [50, 0, 0])
    assert len(train) >= 50


@pytest.mark.timeout(120)
def test_a_one_epoch_train_split_must_hold_a_sample(tmp_path):
    """The training split is one epoch (None samples): one shorter than --seq-length + 1 tokens
    would hold no sample at all, and is an error naming --split and --seq-length."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from fastmoe_megatron.megatron.data import DataConfigError, build_datasets

    prefix = _dataset(tmp_path, ["abcdefghij"] * 3)  # 11 tokens each
    with pytest.raises(DataConfigError, match=r"--split 34,66,0: the train split .* holds 11 "
                                              r"tokens .* fewer than a sample \(--seq-length"):
        build_datasets(prefix, ByteLevelTokenizer(), 16, 1, "34,66,0", [None, 0, 0])
    train, _, _ = build_datasets(prefix, ByteLevelTokenizer(), 10, 1, "34,66,0", [None, 0, 0])
    assert len(train) == 1


def test_index_cache_follows_the_data(tmp_path):
    """Indices are cached beside the data in a folder named after the .idx file's contents: a
    dataset preprocessed again under the same prefix gets fresh indices (it used to train on
    the old documents' indices)."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from fastmoe_megatron.megatron.data import build_datasets, index_cache_for

    def documents_read(prefix):
        cache = index_cache_for(prefix)
        train, _, _ = build_datasets(prefix, ByteLevelTokenizer(), 16, 1, "100,0,0", [400, 0, 0],
                                     cache)
        return cache, len({int(d) for d in train.document_index})

    cache20, read20 = documents_read(_dataset(tmp_path, [f"doc {i} " * 8 for i in range(20)]))
    cache200, read200 = documents_read(_dataset(tmp_path, [f"doc {i} " * 8 for i in range(200)]))
    assert cache20.startswith(str(tmp_path / "data" / "index_cache" / "corpus-"))
    assert cache20 != cache200 and (read20, read200) == (20, 200)


@pytest.mark.parametrize("flags,named", [
    (["--data-path", "nowhere/corpus"], "--data-path nowhere/corpus: nowhere/corpus.bin and"),
    (["--vocab-file", "v.json"], "--vocab-file and --merge-file go together"),
    (["--vocab-file", "v.json", "--merge-file", "m.txt"], "--vocab-file v.json: no such file"),
])
def test_data_flags_are_checked_at_start(flags, named):
    from fastmoe_megatron.megatron.pretrain_gpt import build_parser, validate_args

    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        validate_args(build_parser().parse_args(flags), 1)


def test_data_path_may_name_the_bin_file(tmp_path):
    from fastmoe_megatron.megatron.pretrain_gpt import build_parser, validate_args

    prefix = _dataset(tmp_path, ["a document"])
    args = validate_args(build_parser().parse_args(["--data-path", prefix + ".bin"]), 1)
    assert args.data_path == prefix
