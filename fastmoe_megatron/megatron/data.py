"""Training data for pretrain_gpt: megatron-core's GPTDataset over indexed (.bin/.idx) data, and
a deterministic data-parallel batch order that can resume at any iteration.

Without ``--data-path`` the default corpus is used: the Python standard library's source,
tokenized once into ``<cache>/data/stdlib_<tokenizer>`` (rank 0 writes it, the others wait).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from .preprocess_data import preprocess


def default_data_prefix(cache_dir: Path, tokenizer_name: str, limit_bytes: int) -> str:
    """Tokenizes the stdlib corpus on the first call (rank 0; the others wait) and returns the
    dataset prefix."""
    prefix = cache_dir / "data" / f"stdlib_{tokenizer_name}_{limit_bytes}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not Path(str(prefix) + ".idx").is_file():
        preprocess("stdlib", str(prefix), limit_bytes=limit_bytes,
                   log=lambda m: print(m, flush=True))
    if dist.is_initialized():
        dist.barrier()
    return str(prefix)


def build_datasets(data_prefix: str, tokenizer, seq_length: int, seed: int, split: str,
                   num_samples: list[int], cache_dir: Path):
    """(train, valid, test) GPTDatasets of at least ``num_samples`` samples each (None if 0)."""
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
        path_to_cache=str(cache_dir / "index_cache"),
    )
    os.makedirs(config.path_to_cache, exist_ok=True)
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()


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
