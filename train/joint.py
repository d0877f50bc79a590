"""Joint training with the index in the loop, and the two-stage baseline it is compared with.

Joint (:func:`train_joint`): every ``joint.index_refresh_every`` epochs the item index is rebuilt
from the current item tower (k-means IVF, ``joint.nlist`` lists, ``joint.index_dtype``); every step
mines each head row's top-K' candidates from that index and minimizes
``sampled softmax + lambda * BCE(heads) (+ hard-negative softmax)`` over towers and OverArch
together (:mod:`train.joint_step`). At the end the index is rebuilt once more, so the served vectors
are exactly the (fake-quantized) ones the heads last trained on.

With ``joint.warmup_epochs = W`` the first ``W`` epochs train the towers alone (the two-tower loss,
no index), the index is built from them and enters the loop for the remaining epochs.

Two-stage (:func:`train_two_stage`): the towers alone (:func:`train.loop.train`), the index built
afterwards, then the OverArch trained for ``joint.baseline_head_epochs`` (default ``train.epochs``)
epochs on index-mined candidates with frozen towers (the same step with ``train_towers=False``).

Checkpoints are the two-tower checkpoints of :mod:`train.checkpoint` (``eval`` reads them) with the
heads in ``extra["heads"]`` (``overarch``, ``value_model`` state dicts) for ``build-index``. A joint
run does not resume mid-run (it restarts; the two-tower recipe resumes exactly).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from silvertorch.config import ConfigError
from silvertorch.data.batching import Batch, FeatureTable
from silvertorch.data.dataset import RecDataset
from silvertorch.index.search import ItemIndex
from silvertorch.model import RetrievalModel, TwoTower
from train.build_index import build_item_index, embed_catalog
from train.builders import build_optimizer
from train.checkpoint import TrainState, capture_rng, save_checkpoint
from train.config import TrainConfig
from train.joint_step import JointInputs, joint_loss
from train.loop import CHECKPOINT_NAME, Trainer, train
from train.mining import TASK_NAMES, InteractionLabels, mine_candidates

__all__ = ["JointResult", "JointTrainer", "train_joint", "train_two_stage"]


@dataclass
class JointResult:
    """``model``: the TwoTower; ``scorer``: a RetrievalModel over the final index (no eligibility)
    whose OverArch / value model were trained; ``epoch_losses``: mean total loss per epoch,
    ``epoch_head_losses``: mean head BCE per epoch."""

    model: TwoTower
    scorer: RetrievalModel
    dataset: RecDataset
    step: int
    epoch_losses: list[float] = field(default_factory=list)
    epoch_head_losses: list[float] = field(default_factory=list)
    polish_head_losses: list[float] = field(default_factory=list)  # heads alone, towers frozen
    checkpoint: Path | None = None
    seconds: float = 0.0
    index_builds: int = 0


class JointTrainer:
    """Towers + OverArch with the index in the loop (``train_towers=True``), or the OverArch alone
    on a fixed index of frozen towers (``train_towers=False``, ``towers`` given)."""

    def __init__(self, config: TrainConfig, dataset: RecDataset | None = None, *,
                 towers: TwoTower | None = None, train_towers: bool = True) -> None:
        tasks = config.retrieval.overarch.tasks
        bad = [t for t in tasks if t not in TASK_NAMES]
        if bad:
            raise ConfigError("retrieval.overarch.tasks", f"tasks with labels {list(TASK_NAMES)}, got {bad}")
        self.config, self.train_towers = config, train_towers
        self.recipe = "joint" if train_towers else "two_stage"
        self.base = Trainer(config, dataset)  # data, loader, negatives, seeding, the TwoTower
        if towers is not None:
            self.base.model.load_state_dict(towers.state_dict())
        self.model, self.dataset = self.base.model, self.base.dataset
        self.items = FeatureTable(self.dataset.items.features.features, self.model.item_tower.feature_names)
        self.labels = InteractionLabels(self.dataset.train, self.dataset.num_items, config.data.like_threshold)
        self.scorer = self._scorer(self._build_index())
        self.index_builds = 1
        params = nn.ModuleDict({"overarch": self.scorer.overarch})
        if train_towers:
            params["towers"] = self.model
        else:
            self.model.requires_grad_(False)
        self.optimizer = build_optimizer(config.optim, params)
        self.step = 0

    # -- the index ---------------------------------------------------------------------------
    def _build_index(self) -> ItemIndex:
        vectors = embed_catalog(self.model, self.dataset)
        return build_item_index(vectors, self.config)

    def _scorer(self, index: ItemIndex) -> RetrievalModel:
        """A RetrievalModel over ``index`` sharing the user tower and the (trained) heads."""
        prev = getattr(self, "scorer", None)
        attrs = self.dataset.items.features
        if prev is None:
            model = RetrievalModel.build(self.config.retrieval, self.model.user_tower, index, attrs)
        else:
            model = RetrievalModel(self.model.user_tower, index, prev.overarch, prev.value_model,
                                   prev.reranker, attrs, self.config.retrieval)  # fmt: skip
        return model.to(self.base.device)

    def refresh_index(self) -> None:
        """Rebuild the index from the current item tower (k-means + quantization)."""
        self.scorer = self._scorer(self._build_index())
        self.index_builds += 1

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step: mine the batch's head rows from the current index, then the
        joint loss (:func:`train.joint_step.joint_loss`); returns its stats."""
        cfg = self.config
        self.model.train(self.train_towers)
        self.scorer.overarch.train()
        batch = batch.to(self.base.device)
        k = cfg.joint.mine_k or cfg.retrieval.k_prime
        index, nprobe = self.scorer.index, cfg.retrieval.nprobe
        inputs = JointInputs(
            mine=lambda q: mine_candidates(index, q, k, nprobe),
            head_rows=cfg.joint.head_rows,
            negatives=self.base.negatives.sample()[0] if self.base.negatives is not None else None,
        )
        out = joint_loss(
            self.model, self.scorer, self.items, self.labels, batch, inputs,
            head_loss_weight=cfg.joint.head_loss_weight,
            hard_negative_weight=cfg.joint.hard_negative_weight,
            quantize=cfg.joint.index_dtype == "int8", train_towers=self.train_towers,
            head_tower_grad=cfg.joint.head_tower_grad, skip_seen=cfg.joint.skip_seen,
        )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.optim.grad_clip_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip_norm)
        self.optimizer.step()
        self.step += 1
        return out.stats

    def warmup_step(self, batch: Batch) -> dict[str, float]:
        """One step of the towers alone: the two-tower loss of :class:`~silvertorch.model.TwoTower`
        (as in ``train/loop.py``), no index, the joint optimizer (the heads get no gradient, so
        Adam leaves them unchanged). Returns its stats with ``head_loss`` 0."""
        self.model.train()
        batch = batch.to(self.base.device)
        negatives = None
        if self.base.negatives is not None:
            ids, kjt = self.base.negatives.sample()
            negatives = (ids.to(self.base.device), kjt.to(self.base.device))
        out = self.model(batch, negatives)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.config.optim.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip_norm)
        self.optimizer.step()
        self.step += 1
        return {**out.stats, "head_loss": 0.0}

    # -- the loop ----------------------------------------------------------------------------
    def save(self, path: Path | None = None) -> Path:
        """A two-tower checkpoint with the heads in ``extra["heads"]``."""
        heads = {"overarch": self.scorer.overarch.state_dict(),
                 "value_model": self.scorer.value_model.state_dict()}  # fmt: skip
        state = TrainState(step=self.step, epoch=self.base.loader.epoch,
                           loader=self.base.loader.state_dict(), rng=capture_rng(),
                           extra={"heads": heads, "recipe": self.recipe})  # fmt: skip
        return save_checkpoint(path or self.base.out_dir / CHECKPOINT_NAME, model=self.model,
                               optimizer=self.optimizer, state=state,
                               config=self.base._config_flat, config_hash=self.base._config_hash)  # fmt: skip

    def _run_epochs(self, epochs: int, total: int, losses: list[float], head_losses: list[float],
                    refresh: bool, warmup: int = 0) -> None:
        """Train ``epochs`` over the loader (at most ``total`` steps in all), refreshing the index
        every ``joint.index_refresh_every`` epochs when ``refresh``; the first ``warmup`` epochs
        train the towers alone (:meth:`warmup_step`) and the index is rebuilt when they end."""
        loader, joint = self.base.loader, self.config.joint
        desc = "joint" if self.train_towers else "heads"
        bar = tqdm(total=min(total, epochs * len(loader)), disable=not self.config.train.progress,
                   desc=desc, unit="step", dynamic_ncols=True)  # fmt: skip
        steps = 0
        for epoch in range(epochs):
            if epoch >= warmup and epoch > 0 and (
                epoch == warmup or (refresh and (epoch - warmup) % joint.index_refresh_every == 0)
            ):
                self.refresh_index()  # the index enters the loop built from the warmed-up towers
            step = self.warmup_step if epoch < warmup else self.train_step
            sums = {"loss": 0.0, "head_loss": 0.0}
            n = 0
            for batch in loader:
                stats = step(batch)
                sums["loss"] += stats["loss"]
                sums["head_loss"] += stats["head_loss"]
                n += 1
                steps += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.4f}", head=f"{stats['head_loss']:.4f}")
                if steps >= total:
                    break
            if n:
                losses.append(sums["loss"] / n)
                head_losses.append(sums["head_loss"] / n)
                bar.write(f"{desc} epoch {epoch + 1}/{epochs}: loss {sums['loss'] / n:.4f} "
                          f"(heads {sums['head_loss'] / n:.4f})")  # fmt: skip
            if steps >= total:
                break
        bar.close()

    def freeze_towers(self) -> None:
        """From here on only the heads train (the towers and the index stay as they are)."""
        self.train_towers = False
        self.model.requires_grad_(False)
        self.optimizer = build_optimizer(self.config.optim, nn.ModuleDict({"overarch": self.scorer.overarch}))

    def fit(self, epochs: int | None = None) -> JointResult:
        """Train ``epochs`` (default ``train.epochs``, capped by ``train.max_steps``), then, in the
        joint recipe, ``joint.head_polish_epochs`` of the heads alone on the final index."""
        loop = self.config.train
        epochs = epochs or loop.epochs
        total = epochs * len(self.base.loader)
        if loop.max_steps is not None:
            total = min(total, loop.max_steps)
        result = JointResult(self.model, self.scorer, self.dataset, 0)
        start = time.perf_counter()
        joint_recipe = self.train_towers
        warmup = self.config.joint.warmup_epochs if joint_recipe else 0
        if warmup > epochs:
            raise ConfigError("joint.warmup_epochs", f"<= the {epochs} training epochs, got {warmup}")
        self._run_epochs(epochs, total, result.epoch_losses, result.epoch_head_losses,
                         refresh=self.train_towers, warmup=warmup)
        if joint_recipe:
            self.refresh_index()  # serve exactly the vectors the towers ended with
            polish = self.config.joint.head_polish_epochs
            if polish:
                self.freeze_towers()
                self._run_epochs(polish, polish * len(self.base.loader), [],
                                 result.polish_head_losses, refresh=False)
        result.scorer, result.step = self.scorer, self.step
        result.index_builds = self.index_builds
        result.checkpoint = self.save()
        result.seconds = time.perf_counter() - start
        return result


def train_joint(config: TrainConfig, dataset: RecDataset | None = None) -> JointResult:
    """The joint recipe (see the module docstring)."""
    return JointTrainer(config, dataset).fit()


def train_two_stage(config: TrainConfig, dataset: RecDataset | None = None) -> JointResult:
    """The baseline: towers alone, then the index, then the OverArch on frozen towers.

    Stage checkpoints go to ``<out_dir>/towers`` and ``<out_dir>`` (the latter with the heads)."""
    out = Path(config.train.out_dir)
    stage1 = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(out / "towers")))
    start = time.perf_counter()
    towers = train(stage1, dataset=dataset)
    heads = JointTrainer(config, towers.dataset, towers=towers.model, train_towers=False)
    result = heads.fit(config.joint.baseline_head_epochs or config.train.epochs)
    result.epoch_losses = towers.epoch_losses
    result.seconds = time.perf_counter() - start
    return result
