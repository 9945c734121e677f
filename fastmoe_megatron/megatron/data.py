"""Training data for pretrain_gpt: megatron-core's GPTDataset over indexed (.bin/.idx) data, and
a deterministic data-parallel batch order that can resume at any sample.

Without ``--data-path`` the default corpus is used: the Python standard library's source,
tokenized once into ``<cache>/data/stdlib_<tokenizer>_<bytes>`` (by each node's local rank 0, the
others wait; the cache may be node-local). Its indices are built in memory on every rank (they
take milliseconds). With ``--data-path``, megatron-core's GPTDataset indices are cached under
``--data-cache-path`` (default: ``index_cache/`` beside the data, as Megatron-LM does), in a
folder named after the ``.idx`` file's contents, so a re-preprocessed dataset never reuses stale
indices. Global rank 0 builds them and the other ranks read them: the folder must be visible to
every rank (shared storage, like the data).

The training split is one epoch of megatron-core's shuffled samples; ``BatchIterator`` reads
epoch ``e > 0`` through a permutation seeded by ``--seed`` and ``e``. So the sample a run reads at
any position depends on the data, ``--seq-length``, ``--split`` and ``--seed`` only, never on
``--train-iters`` or the global batch size, and a run extended or resumed with other values reads
on from where it stopped.

``preprocess_data`` records the tokenizer beside the data (``PREFIX.tokenizer.json``); a run with
another tokenizer is refused at start-up, and a token id beyond the run's vocabulary (data
made elsewhere) when it is read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .preprocess_data import preprocess, tokenizer_record_path


def _file_digest(*paths, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()[:12]


def default_data_prefix(cache_dir: Path, limit_bytes: int, vocab_file=None, merge_file=None) -> str:
    """Tokenizes the stdlib corpus on the first call (each node's local rank 0; the others
    wait) with the byte-level tokenizer, or with the BPE of ``vocab_file``/``merge_file`` (the
    cache is named after their contents), and returns the dataset prefix."""
    name = "bytes" if vocab_file is None else f"bpe-{_file_digest(vocab_file, merge_file)}"
    prefix = cache_dir / "data" / f"stdlib_{name}_{limit_bytes}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if local_rank == 0 and not Path(str(prefix) + ".idx").is_file():
        preprocess("stdlib", str(prefix), vocab_file, merge_file, limit_bytes=limit_bytes,
                   log=lambda m: print(m, flush=True))
    if dist.is_initialized():
        dist.barrier()
    return str(prefix)


def index_cache_for(data_prefix: str, data_cache_path=None) -> str:
    """Where the GPTDataset indices of ``data_prefix`` are cached: a folder under
    ``data_cache_path`` (default: ``index_cache`` beside the data) named after the dataset and
    its ``.idx`` file's contents."""
    base = Path(data_cache_path) if data_cache_path else Path(data_prefix).parent / "index_cache"
    return str(base / f"{Path(data_prefix).name}-{_file_digest(data_prefix + '.idx')}")


def build_datasets(data_prefix: str, tokenizer, seq_length: int, seed: int, split: str,
                   num_samples: list[int | None], index_cache: str = ""):
    """(train, valid, test) GPTDatasets of at least ``num_samples`` samples each (not built
    where 0; one epoch where None). ``index_cache``: where the indices are cached ("": built in
    memory on every rank)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_prefix], None),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=True,
        path_to_cache=index_cache,
    )
    # Splits nothing reads are not built: megatron-core would build them anyway, and one that
    # the split leaves without documents never finishes (its epoch count loops forever).
    config.split_matrix = [None if n == 0 else s for s, n in zip(config.split_matrix, num_samples)]
    check_tokenizer(data_prefix, tokenizer)
    low_level = GPTDataset.build_low_level_dataset(data_prefix, config)
    _check_bin_size(low_level, data_prefix)
    _check_splits_hold_tokens(low_level, config.split_matrix, split, data_prefix,
                              [seq_length + 1 if n is None else 1 for n in num_samples])
    if index_cache:
        os.makedirs(index_cache, exist_ok=True)
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()


class DataConfigError(ValueError):
    """A flag that the data shows to be wrong (found once the data is open, after start-up).
    ``every_rank``: whether every rank finds it (checks of the whole dataset), or only those that
    read the faulty samples."""

    def __init__(self, message: str, every_rank: bool = True):
        super().__init__(message)
        self.every_rank = every_rank


def check_tokenizer(data_prefix: str, tokenizer) -> None:
    """Refuses a dataset that ``preprocess_data`` tokenized with another tokenizer than the run's
    (its ids would mean other tokens, or lie beyond the vocabulary). Data without the record
    (made by Megatron-LM's tool) is checked as it is read (``BatchIterator``)."""
    path = tokenizer_record_path(data_prefix)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataConfigError(f"--data-path {data_prefix}: {path} is unreadable ({exc}); run "
                              "preprocess_data again") from None
    if not hasattr(tokenizer, "record"):  # another tokenizer than ours: nothing to compare
        return
    mine = tokenizer.record()
    if saved != mine:
        raise DataConfigError(
            f"--data-path {data_prefix} was tokenized with {_describe(saved)} ({path}), but this "
            f"run's tokenizer is {_describe(mine)}: pass the --vocab-file/--merge-file the data "
            "was made with (neither for the byte-level tokenizer), or run preprocess_data again")


def _describe(record: dict) -> str:
    files = f", vocab and merges {record['files']}" if record.get("files") else ""
    return (f"{record.get('class')} (vocabulary {record.get('vocab_size')}, end of document "
            f"{record.get('eod')}{files})")


def _check_bin_size(low_level, data_prefix: str) -> None:
    """The ``.bin`` must be as long as its ``.idx`` says: a truncated or swapped one would
    otherwise pass start-up and fail at the first sample read past its end, hours into a run."""
    index = low_level.index
    if not len(index.sequence_lengths):
        return
    want = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    have = os.path.getsize(data_prefix + ".bin")
    if have != want:
        raise DataConfigError(
            f"--data-path {data_prefix}: {data_prefix}.bin holds {have} bytes, but its .idx "
            f"describes {want}: the two files do not belong together (truncated or replaced); "
            "run preprocess_data again")


def _check_splits_hold_tokens(low_level, split_matrix, split: str, data_prefix: str,
                              least: list[int]) -> None:
    """Each split to be read must hold ``least`` tokens: a training split of one epoch a whole
    sample (``--seq-length`` + 1), and any other one a token (megatron-core repeats its epochs
    until it has the samples asked for, forever on one without tokens). A split's documents are
    its share of the sequences, rounded as megatron-core rounds them."""
    lengths = low_level.sequence_lengths
    for name, bounds, need in zip(("train", "valid", "test"), split_matrix, least):
        if bounds is None:
            continue
        begin, end = (int(round(b * float(len(lengths)))) for b in bounds)
        tokens = int(lengths[begin:end].sum()) if end > begin else 0
        if tokens < need:
            raise DataConfigError(
                f"--split {split}: the {name} split of the dataset {data_prefix} holds "
                f"{tokens} tokens ({end - begin} of its {len(lengths)} documents), fewer than "
                f"{'a sample (--seq-length + 1)' if need > 1 else 'one'}; give it a larger share "
                "or use more data")


class BatchIterator:
    """Microbatches for one data-parallel rank, in a fixed order.

    Each iteration consumes the next ``G`` samples (G = global batch), from ``start_sample`` on;
    data-parallel rank ``r`` takes its contiguous share and cuts it into microbatches. Ranks of
    one model replica (tensor and pipeline parallel) read the same samples, so nothing has to be
    broadcast, and starting at the samples a run had consumed resumes exactly where it stopped,
    whatever the global batch size is now. Sample ``k`` is item ``k`` of the dataset in its first
    pass, and in pass ``e > 0`` item ``k mod n`` of a permutation seeded by ``seed`` and ``e``.

    ``vocab_size``: token ids must lie below it; one that does not (data made with another
    tokenizer) is a ``DataConfigError`` naming ``source``, not an index error in the model.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 start_sample: int = 0, device: str | torch.device = "cpu", seed: int = 0,
                 vocab_size: int | None = None, source: str = "the dataset"):
        if not len(dataset):
            raise DataConfigError(f"--data-path {source}: the split read here holds no sample")
        self.dataset = dataset
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.sample = start_sample  # samples of the dataset consumed before this iteration
        self.device = device
        self.seed, self.vocab_size, self.source = seed, vocab_size, source
        self._queue: list[dict] = []
        self._order: tuple[int, torch.Tensor | None] = (0, None)  # (pass, its permutation)

    def item(self, k: int) -> int:
        """The dataset item that sample ``k`` reads."""
        n = len(self.dataset)
        epoch, j = divmod(k, n)
        if epoch == 0:
            return j
        if self._order[0] != epoch:
            seed = int(hashlib.sha256(f"{self.seed}:{epoch}".encode()).hexdigest()[:15], 16)
            self._order = (epoch, torch.randperm(  # int32: half the memory of a huge epoch
                n, generator=torch.Generator().manual_seed(seed),
                dtype=torch.int32 if n < 2 ** 31 else torch.int64))
        return int(self._order[1][j])

    def _fill(self):
        base = self.sample + self.dp_rank * self.per_rank
        for m in range(0, self.per_rank, self.micro_batch):
            idx = [self.item(base + m + j) for j in range(self.micro_batch)]
            samples = [self.dataset[i] for i in idx]
            batch = {}
            for key in samples[0]:
                batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
            self._check_ids(batch, idx)
            self._queue.append({k: v.to(self.device) for k, v in batch.items()})
        self.sample += self.global_batch

    def _check_ids(self, batch: dict, idx: list[int]) -> None:
        if self.vocab_size is None:
            return
        for key in ("tokens", "labels"):
            if key in batch and batch[key].numel() and int(batch[key].max()) >= self.vocab_size:
                row = int(batch[key].max(dim=-1).values.argmax())
                raise DataConfigError(
                    f"--data-path {self.source}: item {idx[row]} holds token id "
                    f"{int(batch[key].max())}, beyond this run's vocabulary of {self.vocab_size}: "
                    "the data was tokenized with another tokenizer (pass its --vocab-file/"
                    "--merge-file, or run preprocess_data again)", every_rank=False)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            self._fill()
        return self._queue.pop(0)
