"""The training loop: one :class:`Trainer` owns data, model, optimizer, loader and RNGs.

Exact resume: a checkpoint holds parameters, optimizer state, the loader cursor (epoch, batches
consumed), and the RNG states (torch, Python, the negative sampler); restoring them and
continuing gives bit-identical parameters to an uninterrupted run on the same machine/threads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from silvertorch.data.batching import Batch, InteractionLoader
from silvertorch.data.dataset import RecDataset
from silvertorch.model import TwoTower
from train.builders import (
    build_model,
    build_optimizer,
    load_dataset,
    seed_everything,
    training_view,
)
from train.checkpoint import (
    CheckpointError,
    TrainState,
    capture_rng,
    restore_checkpoint,
    restore_rng,
    save_checkpoint,
)
from train.config import TrainConfig, config_hash, semantic_config
from train.negatives import check_batches, uniform_negatives

__all__ = ["Trainer", "TrainResult", "train"]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns. ``epoch_losses``: mean loss of each epoch finished in
    this call (a resumed, partial epoch counts only its own steps)."""

    model: TwoTower
    dataset: RecDataset
    step: int
    epoch: int
    epoch_losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0


class Trainer:
    """Builds everything from ``config`` (``dataset`` may be passed to skip loading)."""

    def __init__(self, config: TrainConfig, dataset: RecDataset | None = None) -> None:
        self.config = config
        loop = config.train
        seed_everything(loop.seed, loop.deterministic)
        self.device = torch.device(loop.device)
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        self.train_data = training_view(self.dataset, config.data)
        self.model = build_model(config, self.dataset, self.device)
        self.optimizer = build_optimizer(config.optim, self.model)
        self.loader = InteractionLoader(
            self.train_data,
            loop.batch_size,
            seed=loop.seed,
            shuffle=True,
            drop_last=True,
            user_keys=self.model.user_tower.feature_names,
            item_keys=self.model.item_tower.feature_names,
            like_threshold=config.data.like_threshold,
        )
        check_batches(self.loader, loop.batch_size)
        self.negatives = uniform_negatives(self.dataset.items.features.features,
                                           self.model.item_tower.feature_names,
                                           config.model.loss.num_uniform_negatives, loop.seed)
        self.step = 0
        self.out_dir = Path(loop.out_dir)
        self._config_flat = semantic_config(config)
        self._config_hash = config_hash(config)

    # -- checkpoints -------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        return {"negatives": self.negatives.generator} if self.negatives is not None else {}

    def save(self, path: str | Path | None = None) -> Path:
        """Atomically write the full training state (default ``out_dir/checkpoint.pt``)."""
        state = TrainState(
            step=self.step,
            epoch=self.loader.epoch,
            loader=self.loader.state_dict(),
            rng=capture_rng(self._generators()),
        )
        return save_checkpoint(
            path or self.out_dir / CHECKPOINT_NAME,
            model=self.model,
            optimizer=self.optimizer,
            state=state,
            config=self._config_flat,
            config_hash=self._config_hash,
        )

    def resume(self, path: str | Path | None = None) -> TrainState:
        """Load a checkpoint (default ``out_dir/checkpoint.pt``) written by a run of the same
        config; raises :class:`CheckpointError` (nothing changed) if it is corrupt or different."""
        path = Path(path or self.out_dir / CHECKPOINT_NAME)
        state = restore_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            config=self._config_flat,
            config_hash=self._config_hash,
        )
        try:
            self.loader.load_state_dict(state.loader)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: loader state does not fit: {err}") from None
        restore_rng(state.rng, self._generators())
        self.step = state.step
        return state

    # -- training ----------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on ``batch``; returns the loss stats."""
        self.model.train()
        batch = batch.to(self.device)
        negatives = None
        if self.negatives is not None:
            ids, kjt = self.negatives.sample()
            negatives = (ids.to(self.device), kjt.to(self.device))
        out = self.model(batch, negatives)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = self.config.optim.grad_clip_norm
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.step += 1
        return out.stats

    def _log(self, record: dict[str, float | int]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> TrainResult:
        """Train until ``train.epochs`` epochs (or ``train.max_steps`` steps) are done, writing a
        checkpoint every ``checkpoint_every`` steps, at every epoch end and at the end."""
        loop = self.config.train
        per_epoch = len(self.loader)
        done = self.loader.epoch * per_epoch + self.loader.position
        total = loop.epochs * per_epoch
        if loop.max_steps is not None:
            total = min(total, loop.max_steps)
        result = TrainResult(self.model, self.dataset, self.step, self.loader.epoch)
        start = time.perf_counter()
        bar = tqdm(total=total, initial=min(done, total), disable=not loop.progress,
                   desc="train", unit="step", dynamic_ncols=True)  # fmt: skip
        ema_rate = None
        stop = loop.max_steps is not None and self.step >= loop.max_steps
        while self.loader.epoch < loop.epochs and not stop:
            loss_sum, loss_n = 0.0, 0
            epoch = self.loader.epoch
            last = time.perf_counter()
            for batch in self.loader:
                stats = self.train_step(batch)
                now = time.perf_counter()  # examples/s includes batching, not only the step
                rate = batch.size / max(now - last, 1e-9)
                last = now
                ema_rate = rate if ema_rate is None else 0.9 * ema_rate + 0.1 * rate
                loss_sum += stats["loss"]
                loss_n += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.4f}", ex_s=f"{ema_rate:,.0f}")
                if self.step % loop.log_every == 0:
                    self._log(
                        {"step": self.step, "epoch": epoch, "examples_per_s": ema_rate, **stats}
                    )
                if loop.checkpoint_every and self.step % loop.checkpoint_every == 0:
                    result.checkpoint = self.save()
                if loop.max_steps is not None and self.step >= loop.max_steps:
                    stop = True
                    break
            if loss_n and not stop:
                result.epoch_losses.append(loss_sum / loss_n)
                bar.write(f"epoch {epoch + 1}/{loop.epochs}: mean loss {loss_sum / loss_n:.4f}")
                result.checkpoint = self.save()
        bar.close()
        if result.checkpoint is None or stop:
            result.checkpoint = self.save()
        result.step, result.epoch = self.step, self.loader.epoch
        result.seconds = time.perf_counter() - start
        return result


def train(
    config: TrainConfig, *, resume: bool = False, dataset: RecDataset | None = None
) -> TrainResult:
    """Build a :class:`Trainer`, optionally resume from ``out_dir/checkpoint.pt``, and fit."""
    trainer = Trainer(config, dataset)
    if resume:
        trainer.resume()
    return trainer.fit()
