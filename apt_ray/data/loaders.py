"""Torch datasets over QA sources, seeded/sharded samplers, and a DataLoader that keeps DataStats."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from apt_ray.data.collate import CollateOutput
from apt_ray.data.stats import DataStats
from apt_ray.data.vqav2 import QAExample, QASource, image_to_bytes

log = logging.getLogger("apt_ray.data")

MIN_EXAMPLES_TO_JUDGE = 200  # bad-image share is judged mid-pass only after this many images


class QADataset(Dataset):
    """A QA source as a map-style torch dataset of `QAExample` dicts."""

    def __init__(self, source: QASource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> QAExample:
        return self.source[index]


class CaptionDataset(Dataset):
    """One (image, caption) pair per distinct image of a Hugging Face split with a `caption` column."""

    def __init__(self, dataset: Any) -> None:
        from datasets import Image

        if isinstance(dataset.features.get("image"), Image):
            dataset = dataset.cast_column("image", Image(decode=False))
        ids = dataset["image_id"] if "image_id" in dataset.column_names else list(range(dataset.num_rows))
        first: dict[Any, int] = {}
        for row, image_id in enumerate(ids):
            first.setdefault(image_id, row)
        self.rows = sorted(first.values())
        self.dataset = dataset.select_columns(["image", "caption"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[self.rows[index]]
        return {"image": image_to_bytes(row["image"]), "caption": str(row["caption"])}


class CountingLoader:
    """Iterates a DataLoader whose collate returns `CollateOutput`, yielding the batch dicts.

    Folds each batch's counts into `stats` (in the main process, so worker processes are
    covered), skips batches left empty by undecodable images, raises UserError when the share
    of undecodable images passes `max_bad_image_fraction`, and logs a summary after each pass.
    Each pass uses the next epoch of the sampler (0, 1, 2, ...) unless `set_epoch` says otherwise,
    so shuffling is a function of (seed, epoch) only.
    """

    def __init__(self, loader: DataLoader, stats: DataStats, *, max_bad_image_fraction: float) -> None:
        self.loader = loader
        self.stats = stats
        self.max_bad_image_fraction = max_bad_image_fraction
        self._epoch = 0

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` for the next pass (reshuffles deterministically)."""
        self._epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self._epoch)
        self._epoch += 1
        self.stats.start_pass()
        for out in self.loader:
            out = CollateOutput(*out)
            self.stats.add(out.counts)
            self.stats.check_bad_images(self.max_bad_image_fraction, min_examples=MIN_EXAMPLES_TO_JUDGE)
            if out.counts.examples > out.counts.undecodable_images:
                yield out.batch
        self.stats.check_bad_images(self.max_bad_image_fraction, min_examples=1)
        if self.stats.pass_undecodable_images or self.stats.pass_truncated_texts:
            log.warning("data %s", self.stats.summary())


def make_loader(
    dataset: Dataset,
    collate: Callable[[list[Any]], CollateOutput],
    stats: DataStats,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    max_bad_image_fraction: float = 0.05,
) -> CountingLoader:
    """A CountingLoader; shuffling and sharding use a DistributedSampler seeded with `seed`
    (with world_size 1 too, so the order depends only on seed and epoch)."""
    if shuffle or world_size > 1:
        sampler: Any = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
    else:
        sampler = SequentialSampler(dataset)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    return CountingLoader(loader, stats, max_bad_image_fraction=max_bad_image_fraction)
