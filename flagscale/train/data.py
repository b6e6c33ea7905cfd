"""Training data from Megatron's indexed dataset (.bin/.idx) through Megatron Core's GPTDataset.

Sample `i` of the run is the same whatever the layout and however often the run was resumed: the
global batch of iteration `it` is samples [it * global_batch, (it + 1) * global_batch), and data-parallel
rank `r` takes its contiguous share of it. So resuming at iteration k needs nothing but k.
"""

from __future__ import annotations

from pathlib import Path


def build_train_dataset(settings, tokenizer, cache_dir: Path):
    """Megatron's GPTDataset over `settings.data.data_path`, sized for the whole run; for data.format=sft the
    chat records of data.sft (flagscale.train.sft)."""
    if settings.data.format == "sft":
        from flagscale.train import sft

        return sft.build_dataset(settings, tokenizer)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    m = settings.model
    config = GPTDatasetConfig(
        random_seed=settings.system.seed,
        sequence_length=m.seq_length,
        blend=([settings.data.data_path], None),
        split=settings.data.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(cache_dir),
        mmap_bin_files=True,
    )
    samples = m.train_iters * m.global_batch_size
    # Rank 0 builds (and caches) the sample index first, the others then read it.
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()
    return train


class Batches:
    """The micro-batches of one data-parallel rank, iteration by iteration."""

    KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_size: int, dp_rank: int) -> None:
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.per_rank = global_batch // dp_size
        self.dp_rank = dp_rank

    def microbatches(self, iteration: int):
        import torch

        first = iteration * self.global_batch + self.dp_rank * self.per_rank
        for start in range(first, first + self.per_rank, self.micro_batch):
            samples = [self.dataset[i] for i in range(start, start + self.micro_batch)]
            batch = {}
            for key in self.KEYS:
                values = [torch.as_tensor(s[key]) for s in samples if key in s]
                if values:
                    batch[key] = torch.stack(values)
            if "attention_mask" in batch and batch["attention_mask"].dim() == 3:
                batch["attention_mask"] = batch["attention_mask"].unsqueeze(1)  # [b, 1, s, s]
            yield batch
