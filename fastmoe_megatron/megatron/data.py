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
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .preprocess_data import preprocess


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
                   num_samples: list[int], index_cache: str = ""):
    """(train, valid, test) GPTDatasets of at least ``num_samples`` samples each (None where 0).
    ``index_cache``: where the indices are cached ("": built in memory on every rank)."""
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
    config.split_matrix = [s if n else None for s, n in zip(config.split_matrix, num_samples)]
    _check_splits_hold_tokens(GPTDataset.build_low_level_dataset(data_prefix, config),
                              config.split_matrix, split, data_prefix)
    if index_cache:
        os.makedirs(index_cache, exist_ok=True)
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()


class DataConfigError(ValueError):
    """A flag that the data shows to be wrong (found once the data is open, after start-up)."""


def _check_splits_hold_tokens(low_level, split_matrix, split: str, data_prefix: str) -> None:
    """Each split to be read must hold a token: megatron-core repeats a split's epochs until it
    has the samples asked for, forever on one without tokens. Its documents are the split's share
    of the sequences, rounded as megatron-core rounds them."""
    lengths = low_level.sequence_lengths
    for name, bounds in zip(("train", "valid", "test"), split_matrix):
        if bounds is None:
            continue
        begin, end = (int(round(b * float(len(lengths)))) for b in bounds)
        if end <= begin or int(lengths[begin:end].sum()) == 0:
            raise DataConfigError(
                f"--split {split}: the {name} split of the dataset {data_prefix} holds no tokens "
                f"({end - begin} of its {len(lengths)} documents); give it a larger share or use "
                "more data")


class BatchIterator:
    """Microbatches for one data-parallel rank, in a fixed order.

    Each iteration consumes the next ``G`` samples of the dataset (G = global batch), from
    ``start_sample`` on; data-parallel rank ``r`` takes its contiguous share and cuts it into
    microbatches. Ranks of one model replica (tensor and pipeline parallel) read the same
    samples, so nothing has to be broadcast, and starting at the samples a run had consumed
    resumes exactly where it stopped, whatever the global batch size is now.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 start_sample: int = 0, device: str | torch.device = "cpu"):
        self.dataset = dataset
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.sample = start_sample  # samples of the dataset consumed before this iteration
        self.device = device
        self._queue: list[dict] = []

    def _fill(self):
        base = self.sample + self.dp_rank * self.per_rank
        for m in range(0, self.per_rank, self.micro_batch):
            idx = [(base + m + j) % len(self.dataset) for j in range(self.micro_batch)]
            samples = [self.dataset[i] for i in idx]
            batch = {}
            for key in samples[0]:
                batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(self.device)
            self._queue.append(batch)
        self.sample += self.global_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            self._fill()
        return self._queue.pop(0)
