"""Sharded multi-rank training: TorchRec ``DistributedModelParallel`` on ``torch.distributed``.

Launched by torchrun / torchx (``launch/train_dist.py``, ``launch/components.py``), one process per
rank. What each rank does, and why it matches single-process :class:`train.loop.Trainer`:

- **Same model, same start.** Every rank builds the unsharded :class:`TwoTower` from the config
  seed (identical on all ranks and to the single-process run), then shards it; the sharded
  parameters are filled from that unsharded initialization (DMP re-initializes shards otherwise).
- **Same batches.** ``train.batch_size`` is the GLOBAL batch. :class:`RankSlicedLoader` walks the
  single-process batch sequence and rank ``r`` takes rows ``[r*B/W, (r+1)*B/W)`` of each batch.
- **Same loss.** :class:`~silvertorch.distributed.two_tower.DistributedTwoTower` gathers the
  embeddings of all ranks and computes the single-process global-batch loss ``L``; the backward
  runs on ``W * L`` because DDP and TorchRec average gradients over ranks (see ``two_tower.py``).
- **Joint recipe** (``joint.enabled``): towers + OverArch with the index in the loop, as
  ``train/joint.py``. The OverArch's attribute tables are a TorchRec EBC
  (``silvertorch/distributed/overarch_tables.py``) sharded by the same plan as the towers' tables,
  its MLP data-parallel; the step is
  :class:`~silvertorch.distributed.retrieval_model.DistributedRetrievalModel` (backward on
  ``W * R + J~``, see there); every rank holds the same index (``train/dist_joint.py``: built before
  sharding in ``JointTrainer``'s RNG order, refreshed from all-gathered item vectors at the start of
  every ``joint.index_refresh_every``-th epoch; its vectors are checkpointed). Warmup and
  heads-only polish epochs are refused (single-process only).
- **Optimizers.** Tables: TorchRec fused optimizer in backward; dense: keyed torch optimizer
  (``train/dist_optim.py``). Adagrad/SGD equal the single-process updates; Adam is lazy Adam on
  tables (GPU only: FBGEMM's CPU kernels have no Adam, an Adam config gets Adagrad tables on CPU,
  warned). ``optim.grad_clip_norm`` is refused (tables update before a global norm exists).
- **Loop.** A plain loop, not TorchRec's ``TrainPipelineSparseDist``: the pipeline overlaps the
  host-to-device copy and the input all-to-all of batch i+1 with the compute of batch i using CUDA
  streams; on CPU (gloo) there are no streams to overlap on and the batch is already on the device,
  and the plain loop is easier to keep step-for-step equal to ``train/loop.py``. On GPUs it is the
  next step (see docs/distributed.md).
- **Metrics.** The loss is the global-batch loss (the same value on every rank); epoch means are
  all-reduced sums / counts; Recall@K / NDCG@K on all-gathered embeddings (rank 0 scores).
- **Checkpoints.** ``torch.distributed.checkpoint`` under ``out_dir/dcp`` (atomic directories and a
  ``latest`` pointer, ``silvertorch/distributed/dcp.py``): sharded tables (the OverArch's too),
  optimizer state (fused table moments are sharded too), step, epoch, loader cursor, RNG and, in
  joint runs, the current index's item vectors. They load on any world size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from silvertorch.data.batching import Batch
from silvertorch.data.dataset import RecDataset
from silvertorch.distributed.collectives import all_reduce_sums
from silvertorch.distributed.dcp import find_latest, load_sharded, save_sharded
from silvertorch.distributed.process_group import DistContext
from silvertorch.distributed.sharding import (
    data_parallel_tables,
    describe_plan,
    plan_sharding,
    shard_model,
    sharding_constraints,
)
from silvertorch.distributed.retrieval_model import DistributedRetrievalModel
from silvertorch.distributed.state import copy_full_state, gather_full_state
from silvertorch.distributed.topology import build_topology
from silvertorch.distributed.two_tower import DistributedTwoTower
from train.builders import build_model, load_dataset, seed_everything, training_view
from train.checkpoint import CheckpointError, capture_rng, restore_rng
from train.config import TrainConfig, config_hash, semantic_config
from train.dist_data import RankSlicedLoader
from train.dist_joint import DistJoint, check_joint_config
from train.dist_optim import (
    combined_optimizer,
    dense_optimizer,
    fuse_embedding_optimizer,
    fuse_overarch_optimizer,
    table_optimizer_name,
)
from train.negatives import check_batches, uniform_negatives

__all__ = ["DistOptions", "DistTrainer", "DistResult", "train_distributed"]

LOG_NAME = "train_log.jsonl"


@dataclass(kw_only=True)
class DistOptions:
    """Knobs of a sharded run that are not in the training config (launcher arguments).

    - ``sharding_types``: allowed for every table (None = all valid on the device; the planner picks).
    - ``topology``: a placement-planner topology file (None = TorchRec defaults).
    - ``checkpoint_dir``: DCP root (None = ``train.out_dir/dcp``); ``keep``: checkpoints kept.
    - ``table_optimizer``: fused optimizer of the tables ("auto" = the config's where FBGEMM has
      it on the device, see ``train/dist_optim.py``); ``table_lr``: its lr (None = config's).
    """

    sharding_types: Sequence[str] | None = None
    topology: str | None = None
    checkpoint_dir: str | None = None
    keep: int = 2
    table_optimizer: str = "auto"
    table_lr: float | None = None


@dataclass
class DistResult:
    """What :meth:`DistTrainer.fit` returns (same on every rank). ``losses``: the global-batch loss
    of every step run in this call; ``epoch_losses``: mean loss of each epoch finished here."""

    step: int
    epoch: int
    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0


class DistTrainer:
    """One rank of a sharded run. Every rank constructs it with the same config (collective)."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: DistContext,
        dataset: RecDataset | None = None,
        options: DistOptions | None = None,
    ) -> None:
        self.config, self.ctx = config, ctx
        self.options = options or DistOptions()
        loop = config.train
        if torch.device(loop.device).type != ctx.device.type:
            raise ValueError(f"train.device={loop.device!r} but this rank runs on {ctx.device}")
        if config.joint.enabled:
            check_joint_config(config)  # before any collective: every rank raises the same error
        seed_everything(loop.seed, loop.deterministic)
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        self.train_data = training_view(self.dataset, config.data)
        model = build_model(config, self.dataset, "cpu")  # identical on every rank (same seed)
        self.loader = RankSlicedLoader(
            self.train_data,
            loop.batch_size,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=loop.seed,
            shuffle=True,
            user_keys=model.user_tower.feature_names,
            item_keys=model.item_tower.feature_names,
            like_threshold=config.data.like_threshold,
        )
        check_batches(self.loader, loop.batch_size)
        self.negatives = uniform_negatives(self.dataset.items.features.features,
                                           model.item_tower.feature_names,
                                           config.model.loss.num_uniform_negatives, loop.seed)
        self.table_optimizer = table_optimizer_name(
            config.optim, ctx.device.type, self.options.table_optimizer
        )
        fuse_embedding_optimizer(config.optim, model, self.table_optimizer, self.options.table_lr)
        self.joint: DistJoint | None = None
        wrapped: DistributedTwoTower
        if config.joint.enabled:
            # index + OverArch drawn as train/joint.py draws them (same RNG order on every rank)
            self.joint = DistJoint(config, self.dataset, model)
            scorer = self.joint.scorer
            wrapped = DistributedRetrievalModel(model, scorer.overarch, scorer.feature_tables())
            # optim.lr: single-process trains these tables in the dense group
            fuse_overarch_optimizer(config.optim, wrapped.overarch, self.table_optimizer)
        else:
            wrapped = DistributedTwoTower(model)
        initial = {k: v.detach().clone() for k, v in wrapped.state_dict().items()}
        compute = ctx.device.type
        constraints = sharding_constraints(wrapped, compute, self.options.sharding_types)
        topology = build_topology(ctx.world_size, compute, self.options.topology)
        self.plan = plan_sharding(
            wrapped, topology, constraints, batch_size=self.loader.local_batch_size
        )
        self.model = shard_model(wrapped, self.plan, ctx.device)
        copy_full_state(self.model, initial)
        self.dense_optimizer = dense_optimizer(config.optim, self.model)
        self.optimizer = combined_optimizer(self.model, self.dense_optimizer)
        self.step = 0
        self.out_dir = Path(loop.out_dir)
        self.checkpoint_dir = Path(self.options.checkpoint_dir or self.out_dir / "dcp")
        self._config_flat = semantic_config(config)
        self._config_hash = config_hash(config)
        self._saved: tuple[int, Path] | None = None  # (step, directory) of the last save / load

    # -- checkpoints -------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        return {"negatives": self.negatives.generator} if self.negatives is not None else {}

    def _state(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}
        if self.joint is not None:  # the vectors the current index was built from (replicated)
            state["index_vectors"] = self.joint.vectors
        return state

    def save(self) -> Path:
        """Collective: write a DCP checkpoint of the current step (atomic; see ``dcp.py``); a step
        already saved (or just resumed from) is not written again."""
        if self._saved is not None and self._saved[0] == self.step:
            return self._saved[1]
        meta = {
            "epoch": self.loader.state_dict()["epoch"],
            "loader": self.loader.state_dict(),
            "config_hash": self._config_hash,
            "config": self._config_flat,
            "world_size": self.ctx.world_size,
            "plan": describe_plan(self.plan),
            "data_parallel_tables": data_parallel_tables(self.plan),
            "table_optimizer": [self.table_optimizer, self.options.table_lr],
        }
        path = save_sharded(
            self.checkpoint_dir, self.step, self._state(), meta,
            rng=capture_rng(self._generators()), keep=self.options.keep,
        )  # fmt: skip
        self._saved = (self.step, path)
        return path

    def latest(self) -> Path | None:
        """The newest complete checkpoint (rank 0 looks, every rank gets the same answer)."""
        found = [str(find_latest(self.checkpoint_dir) or "") if self.ctx.is_main else None]
        dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    def resume(self, path: str | Path | None = None) -> int:
        """Collective: load ``path`` (default: the latest checkpoint) written by a run of the same
        config on ANY world size. Raises :class:`CheckpointError` before touching any state when
        there is none, or when it was written with a different config. Returns the step."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise CheckpointError(f"no complete checkpoint under {self.checkpoint_dir}")
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("config_hash") != self._config_hash:
            saved = meta.get("config", {})
            diff = [f"{k}: checkpoint={saved.get(k)!r} now={self._config_flat.get(k)!r}"
                    for k in sorted(set(saved) | set(self._config_flat))
                    if saved.get(k) != self._config_flat.get(k)]  # fmt: skip
            raise CheckpointError(
                f"{path} was written with a different config: " + ("; ".join(diff[:8]) or "?")
            )
        saved_opt = meta.get("table_optimizer", [None, None])
        if list(saved_opt) != [self.table_optimizer, self.options.table_lr]:
            raise CheckpointError(
                f"{path} was written with table optimizer {saved_opt[0]!r} (lr {saved_opt[1]}), "
                f"this run uses {self.table_optimizer!r} (lr {self.options.table_lr}); pass the same "
                "--table-optimizer / --table-lr to resume"
            )
        saved_dp, now_dp = meta.get("data_parallel_tables", []), data_parallel_tables(self.plan)
        if saved_dp != now_dp:
            raise CheckpointError(
                f"{path}: data-parallel tables differ (checkpoint {saved_dp}, this plan {now_dp}); "
                "their optimizer state lives elsewhere than a sharded table's. Allow the same "
                "tables to be data_parallel (--sharding-types) or none"
            )
        self.dense_optimizer.init_state()  # lazily created moments must exist to load into
        self.dense_optimizer.zero_grad(set_to_none=True)
        state = self._state()
        meta, rng = load_sharded(path, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        if self.joint is not None:
            self.joint.set_vectors(state["index_vectors"])  # exactly the index it was mining from
        self.loader.load_state_dict(meta["loader"])
        if rng:
            restore_rng(rng, self._generators())
        self.step = int(meta["step"])
        self._saved = (self.step, path)
        return self.step

    # -- training ----------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on this rank's rows of a global batch; returns global-loss stats."""
        self.model.train()
        batch = batch.to(self.ctx.device)
        negatives = None
        if self.negatives is not None:
            ids, kjt = self.negatives.sample()  # same draw on every rank (same generator state)
            negatives = (ids.to(self.ctx.device), kjt.to(self.ctx.device))
        self.optimizer.zero_grad(set_to_none=True)
        if self.joint is not None:
            out = self.model(batch, negatives, self.joint.plan())
        else:
            out = self.model(batch, negatives)
        self.model.module.backward_loss(out).backward()  # W * L (joint: W * R + J); tables update here
        self.optimizer.step()
        self.step += 1
        return out.stats

    def _maybe_refresh_index(self, epoch: int) -> None:
        """Joint runs: rebuild the index at the start of every ``joint.index_refresh_every``-th
        epoch (as ``train/joint.py``), not when resuming in the middle of an epoch."""
        every = self.config.joint.index_refresh_every
        if self.joint is None or epoch == 0 or self.loader.position != 0 or epoch % every:
            return
        self.joint.refresh(self.model.module, self.ctx.device)

    def _log(self, record: dict[str, float | int]) -> None:
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / LOG_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> DistResult:
        """Train until ``train.epochs`` (or ``train.max_steps``), checkpointing every
        ``checkpoint_every`` steps, at every epoch end and at the end."""
        loop = self.config.train
        per_epoch = len(self.loader)
        done = self.loader.epoch * per_epoch + self.loader.position
        total = loop.epochs * per_epoch
        if loop.max_steps is not None:
            total = min(total, loop.max_steps)
        result = DistResult(self.step, self.loader.epoch)
        start = time.perf_counter()
        bar = tqdm(total=total, initial=min(done, total), desc=f"train x{self.ctx.world_size}",
                   unit="step", dynamic_ncols=True,
                   disable=not (loop.progress and self.ctx.is_main))  # fmt: skip
        stop = loop.max_steps is not None and self.step >= loop.max_steps
        while self.loader.epoch < loop.epochs and not stop:
            loss_sum, loss_n, examples = 0.0, 0, 0
            epoch = self.loader.epoch
            self._maybe_refresh_index(epoch)
            for batch in self.loader:
                stats = self.train_step(batch)
                result.losses.append(stats["loss"])
                loss_sum, loss_n, examples = loss_sum + stats["loss"], loss_n + 1, examples + batch.size
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.4f}")
                if self.step % loop.log_every == 0:
                    self._log({"step": self.step, "epoch": epoch, "world_size": self.ctx.world_size, **stats})
                if loop.checkpoint_every and self.step % loop.checkpoint_every == 0:
                    result.checkpoint = self.save()
                if loop.max_steps is not None and self.step >= loop.max_steps:
                    stop = True
                    break
            if loss_n and not stop:
                sums = all_reduce_sums({"loss": loss_sum, "steps": loss_n, "examples": examples})
                mean = sums["loss"] / sums["steps"]  # every rank holds the global loss: a check
                result.epoch_losses.append(mean)
                if self.ctx.is_main:
                    bar.write(f"epoch {epoch + 1}/{loop.epochs}: mean loss {mean:.4f} "
                              f"({int(sums['examples'])} examples on {self.ctx.world_size} ranks)")
                result.checkpoint = self.save()
        bar.close()
        if result.checkpoint is None or stop:
            result.checkpoint = self.save()
        result.step, result.epoch = self.step, self.loader.epoch
        result.seconds = time.perf_counter() - start
        return result

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Collective: the whole (unsharded) ``state_dict`` on rank 0, None elsewhere."""
        return gather_full_state(self.model)


def train_distributed(
    config: TrainConfig,
    ctx: DistContext,
    *,
    resume: str = "auto",
    dataset: RecDataset | None = None,
    options: DistOptions | None = None,
) -> tuple[DistTrainer, DistResult]:
    """Build a :class:`DistTrainer`, resume per ``resume`` and fit.

    ``resume``: ``"auto"`` (continue from the latest checkpoint if one exists: what a torchelastic
    restart needs), ``"never"`` (start fresh; existing checkpoints are superseded), ``"require"``
    (fail with :class:`CheckpointError` if none).
    """
    if resume not in ("auto", "never", "require"):
        raise ValueError(f"resume must be 'auto', 'never' or 'require', got {resume!r}")
    trainer = DistTrainer(config, ctx, dataset, options)
    if resume == "require" or (resume == "auto" and trainer.latest() is not None):
        step = trainer.resume()
        if ctx.is_main:
            print(f"resumed from step {step} ({trainer.checkpoint_dir})", flush=True)
    return trainer, trainer.fit()
