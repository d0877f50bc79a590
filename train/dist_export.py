"""A sharded run's weights as a single-process checkpoint (``train/checkpoint.py`` format).

``silvertorch eval``, ``build-index`` and ``export`` read single-process checkpoints; this writes
one from a sharded model: rank 0 gathers the whole tensors (collective) and saves them with the
step, loader cursor, RNG and config hash; a joint run's OverArch (tables gathered from their shards
and mapped back to ``nn.EmbeddingBag`` keys) and value model go to ``extra["heads"]``, as
``train/joint.py`` writes them, so ``build-index`` / ``export`` read it like a single-process one. It carries NO optimizer state (the sharded run's fused
table moments have no single-process layout), so ``Trainer.resume`` refuses it (its optimizer groups
do not match) instead of silently continuing with fresh moments; to continue training, resume the
DCP checkpoint with any world size, 1 included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from silvertorch.distributed.overarch_tables import overarch_state
from train.builders import build_model
from train.checkpoint import TrainState, capture_rng, save_checkpoint

__all__ = ["export_checkpoint", "split_full_state"]


def split_full_state(full: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A gathered sharded state -> (``TwoTower.state_dict()`` keys, ``OverArch.state_dict()`` keys;
    empty for a two-tower run). The OverArch twin's EBC tables map back to ``embeddings.<f>.weight``
    (:func:`~silvertorch.distributed.overarch_tables.overarch_state`)."""
    towers = {k: v for k, v in full.items() if not k.startswith("overarch.")}
    return towers, overarch_state(full, "overarch.")


class _NoOptimizerState:
    """Stands in for the optimizer in :func:`save_checkpoint`: an empty state with no groups."""

    def state_dict(self) -> dict[str, Any]:
        return {"state": {}, "param_groups": []}


def export_checkpoint(trainer: Any, path: str | Path) -> Path | None:
    """Collective: gather ``trainer``'s (:class:`train.distributed.DistTrainer`) weights and write
    them on rank 0 as a single-process checkpoint at ``path``. Returns the path on rank 0."""
    full = trainer.full_state()
    if full is None:
        return None
    towers, heads = split_full_state(full)
    model = build_model(trainer.config, trainer.dataset, "cpu")
    model.load_state_dict(towers)
    loader = trainer.loader.state_dict()
    extra: dict[str, Any] = {"exported_from": "sharded", "world_size": trainer.ctx.world_size}
    joint = getattr(trainer, "joint", None)
    if joint is not None:  # the layout of train/joint.py's checkpoints: heads in extra["heads"]
        joint.scorer.overarch.load_state_dict(heads)
        extra.update(recipe="joint", heads={
            "overarch": joint.scorer.overarch.state_dict(),
            "value_model": joint.scorer.value_model.state_dict(),
        })  # fmt: skip
    state = TrainState(
        step=trainer.step,
        epoch=loader["epoch"],
        loader=loader,
        rng=capture_rng(trainer._generators()),
        extra=extra,
    )
    return save_checkpoint(
        path,
        model=model,
        optimizer=_NoOptimizerState(),  # type: ignore[arg-type]
        state=state,
        config=trainer._config_flat,
        config_hash=trainer._config_hash,
    )
