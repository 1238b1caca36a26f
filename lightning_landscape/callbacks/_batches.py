"""The fixed batches a monitor measures on: drawn once per fit, the same at every measurement."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape.callbacks._compat import COMBINED_LOADERS


def _training_loader(trainer: Any, source: Any, train: bool) -> tuple[Iterable, list[Any]]:
    """What yields batches as ``training_step`` gets them, and the loaders it draws from. The
    monitor's own ``dataloader`` (``train=False``) and a single train loader are drawn as
    they are, without workers (:func:`_detached`). Several train loaders (a dict, list or tuple)
    are combined as the fit combines them (Lightning's default ``"max_size_cycle"`` mode,
    ``"min_size"``, ``"max_size"``; its fit loop refuses ``"sequential"``): a CombinedLoader in
    the fit's mode yields the same structure with one batch of each."""
    if train and isinstance(source, COMBINED_LOADERS):
        source = source.iterables
    combined = getattr(getattr(trainer, "fit_loop", None), "_combined_loader", None)
    mode = getattr(combined, "_mode", "max_size_cycle")
    if not train or not isinstance(source, Mapping | list | tuple):
        return _detached(source), [source]
    detached = apply_to_collection(source, DataLoader, _detached)
    together = COMBINED_LOADERS[0](detached, mode)

    def batches() -> Iterator[Any]:  # iterated only inside the draw's forked RNG
        for batch, _, _ in together:
            yield batch

    return batches(), together.flattened


def draw_batches(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    num_batches: int,
    dataloader: Iterable | None = None,
    seed: int = 0,
) -> list[Any]:
    """Draw ``num_batches`` batches from ``dataloader`` (or the trainer's train dataloader) and
    prepare them as Lightning prepares a training batch: the precision plugin's conversion
    (``64-true`` makes floating tensors float64, ``bf16-true``/``16-true`` half; the mixed
    precisions leave them as they are), ``on_before_batch_transfer``, then the move to the
    module's device through the batch-transfer hooks.

    The draw happens under a forked, seeded RNG: the global RNG is untouched and a resumed run
    draws the same batches again (for a shuffling loader, through the same seed). Under DDP each
    rank draws from its own shard (the loader's ``DistributedSampler``).

    Raises:
        ValueError: if no dataloader is available or it yields no batch.
    """
    loader = dataloader
    if loader is None:
        source = trainer.train_dataloader
        if source is None:
            trainer.fit_loop.setup_data()
            source = trainer.train_dataloader
        if source is None:
            raise ValueError("no training dataloader to draw the monitor's batches from.")
        loader = source
    devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
    loader, loaders = _training_loader(trainer, loader, dataloader is None)
    samplers = [_sampler(one) for one in loaders]
    epochs = {s: s.epoch for s in samplers if isinstance(getattr(s, "epoch", None), int)}
    # a loader's or sampler's own generator (``DataLoader(..., generator=g)``) is the training's
    batch_samplers = [getattr(one, "batch_sampler", None) for one in loaders]
    owned = [getattr(x, "generator", None) for x in [*loaders, *samplers, *batch_samplers]]
    generators = {id(g): (g, g.get_state()) for g in owned if isinstance(g, torch.Generator)}
    for one in loaders:
        if _stateful(one) and not isinstance(one, DataLoader):  # else rebuilt (:func:`_detached`)
            rank_zero_warn(
                f"The monitors draw their fixed batches by iterating the train loader, a "
                f"{type(one).__name__} whose position Lightning saves in checkpoints "
                "(`state_dict`): where that position is the last iterator's, a resume from a "
                "checkpoint may replay or skip batches. Pass the monitors a `dataloader=` of "
                "their own (a list of batches will do) to leave it alone.",
                category=UserWarning,
            )
    try:
        for sampler in epochs:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(0)  # the same shard order at fit start and after a resume
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            batches = list(itertools.islice(iter(loader), num_batches))
            if not batches:
                raise ValueError("the dataloader yielded no batch for the monitor.")
            # transfer hooks (GPU augmentations) may draw random numbers too
            return [_prepared(trainer, pl_module, b) for b in batches]
    finally:
        for sampler, epoch in epochs.items():
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        for generator, state in generators.values():
            generator.set_state(state)


def drawn_everywhere(draw: Callable[[], list[Any]]) -> tuple[list[Any], ValueError | None]:
    """``draw()``'s batches, or, where it raised a ValueError on some rank (a loader that yields
    none there), an error naming the ranks, the same on every rank: the measurement then logs
    NaN with one warning on all of them. Before, that rank alone raised, its fit died, and the
    others were left in their next collective."""
    try:
        batches, err = draw(), None
    except ValueError as failure:
        batches, err = [], failure
    if not is_distributed():
        return batches, err
    flags = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    flags[dist.get_rank()] = float(err is not None)
    ranks = [r for r, bad in enumerate(all_reduce_sum_(flags).tolist()) if bad]
    if not ranks:
        return batches, None
    why = f" ({err})" if err is not None else ""
    return batches, ValueError(f"no fixed batches on rank(s) {ranks}{why}.")


def _sampler(loader: Any) -> Any:
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return sampler if sampler is not None else getattr(loader, "sampler", None)


def _prepared(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """One batch through the steps of Lightning's training loop, in its order."""
    batch = trainer.precision_plugin.convert_input(batch)
    before = getattr(pl_module, "_on_before_batch_transfer", None)  # pytorch-lightning >= 2.0
    if before is not None:
        batch = before(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, pl_module.device)


def _stateful(loader: Any) -> bool:
    """Whether Lightning saves the loader's position in checkpoints (its ``_Stateful``
    protocol: ``state_dict`` and ``load_state_dict``)."""
    return all(callable(getattr(loader, m, None)) for m in ("state_dict", "load_state_dict"))


def _detached(loader: Iterable) -> Iterable:
    """A loader whose iteration cannot touch the training's: a DataLoader with workers, or with
    a saved position (torchdata's ``StatefulDataLoader``, whose ``state_dict`` describes the
    last iterator handed out: a checkpoint saved the monitor's, and a resume replayed batches),
    is rebuilt as a plain one without workers over the same dataset, sampler and collate
    function (with ``persistent_workers`` a second ``iter`` would reset and share the fit
    loop's live iterator)."""
    if not isinstance(loader, DataLoader):
        return loader
    if loader.num_workers == 0 and not _stateful(loader):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn
        )
    if loader.batch_sampler is None:  # batch_size=None: the dataset's items are the batches
        return DataLoader(
            loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn
        )
    return DataLoader(
        loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn
    )
