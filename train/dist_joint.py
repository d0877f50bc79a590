"""The joint recipe's per-run state in a sharded run: the index, the labels, the head terms.

:class:`DistJoint` is built by every rank BEFORE sharding, from the unsharded TwoTower, in the same
order as :class:`train.joint.JointTrainer` (catalog embedded, index built with seed
``train.seed``, then ``RetrievalModel.build`` draws the OverArch from the global RNG), so the
OverArch starts with the single-process weights and every rank holds the same index.

Refreshes (:meth:`DistJoint.refresh`): every rank embeds an equal share of the catalog through the
SHARDED item tower, the shares are all-gathered (``train/dist_eval.embed_all``) and every rank
builds the index from the same vectors with the same seed - identical indexes, so every rank mines
the same candidates. The vectors of the current index are part of the DCP checkpoint
(:attr:`DistJoint.vectors`): a resumed run rebuilds exactly the index it was mining from.

The head (+ hard-negative) terms are :func:`train.joint_step.head_terms` /
:func:`~train.joint_step.hard_negative_loss`, the single-process code, on the gathered rows
(:class:`~silvertorch.distributed.retrieval_model.GlobalRows`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from silvertorch.config import ConfigError
from silvertorch.data.batching import FeatureTable
from silvertorch.data.dataset import RecDataset
from silvertorch.distributed.retrieval_model import DistributedRetrievalModel, GlobalRows, JointPlan
from silvertorch.model import RetrievalModel, TwoTower
from train.build_index import build_item_index, embed_catalog
from train.config import TrainConfig
from train.dist_eval import embed_all
from train.joint_step import hard_negative_loss, head_terms
from train.mining import TASK_NAMES, InteractionLabels, mine_candidates

__all__ = ["DistJoint", "check_joint_config"]


def check_joint_config(config: TrainConfig) -> None:
    """Refuse joint settings the sharded recipe does not implement, naming the key."""
    tasks = config.retrieval.overarch.tasks
    bad = [t for t in tasks if t not in TASK_NAMES]
    if bad:
        raise ConfigError("retrieval.overarch.tasks", f"tasks with labels {list(TASK_NAMES)}, got {bad}")
    joint = config.joint
    if joint.warmup_epochs:
        raise ConfigError(
            "joint.warmup_epochs",
            "0 for sharded training (towers-only warmup epochs leave the OverArch without "
            "gradients, which DDP refuses); run the warmup as a two-tower job first",
        )
    if joint.head_polish_epochs:
        raise ConfigError(
            "joint.head_polish_epochs",
            "0 for sharded training (heads-only epochs on frozen towers are single-process: "
            "train/joint.py)",
        )


class DistJoint:
    """Index, labels and head terms of one rank of a sharded joint run (see the module docstring).

    Args:
        config: the run config (``joint.enabled``).
        dataset: the full dataset (labels from its TRAIN split).
        model: the UNSHARDED TwoTower every rank built from the seed (the initial index's vectors).
    """

    def __init__(self, config: TrainConfig, dataset: RecDataset, model: TwoTower) -> None:
        check_joint_config(config)
        self.config = config
        self.num_items = dataset.num_items
        self.items = FeatureTable(dataset.items.features.features, model.item_tower.feature_names)
        self.labels = InteractionLabels(dataset.train, dataset.num_items, config.data.like_threshold)
        self.vectors = embed_catalog(model, dataset)  # (N, D) f32 of the current index
        index = build_item_index(self.vectors, config)
        # the OverArch / value model drawn exactly as JointTrainer draws them
        self.scorer = RetrievalModel.build(config.retrieval, model.user_tower, index, dataset.items.features)
        self.index_builds = 1

    @property
    def index(self):  # type: ignore[no-untyped-def]
        return self.scorer.index

    def set_vectors(self, vectors: Tensor) -> None:
        """Rebuild the index from ``vectors (N, D) f32`` (the same on every rank)."""
        if vectors.shape != self.vectors.shape:
            raise ValueError(f"index vectors {tuple(vectors.shape)}, expected {tuple(self.vectors.shape)}")
        self.vectors = vectors.detach().cpu().float().clone()
        self.scorer.index = build_item_index(self.vectors, self.config)
        self.index_builds += 1

    @torch.no_grad()
    def refresh(self, module: nn.Module, device: torch.device) -> None:
        """Collective: embed the catalog with ``module.item_tower`` (sharded, eval mode) in shares,
        all-gather, rebuild the index on every rank."""
        was = module.training
        module.eval()
        try:
            vectors = embed_all(module.item_tower, self.items, self.num_items, device)
        finally:
            module.train(was)
        self.set_vectors(vectors)

    def plan(self) -> JointPlan:
        """The per-step inputs of :meth:`DistributedRetrievalModel.forward`."""
        cfg = self.config
        k = cfg.joint.mine_k or cfg.retrieval.k_prime
        index, nprobe = self.scorer.index, cfg.retrieval.nprobe
        return JointPlan(
            mine=lambda q: mine_candidates(index, q, k, nprobe),
            head_rows=cfg.joint.head_rows,
            item_kjt=self.items.kjt,
            quantize=cfg.joint.index_dtype == "int8",
            head_loss=self.head_loss,
        )

    def head_loss(
        self, rows: GlobalRows, model: DistributedRetrievalModel
    ) -> tuple[list[Tensor], dict[str, float]]:
        """``[lambda * heads, (mu * hard)]`` and their stats, as ``train/joint_step.joint_loss``."""
        joint = self.config.joint
        terms = head_terms(
            model.score_candidates, rows.query, rows.positives, rows.cand, rows.mined, rows.item_ids,
            rows.user_ids, rows.labels, self.labels, model.overarch.tasks,
            head_tower_grad=joint.head_tower_grad, skip_seen=joint.skip_seen,
        )  # fmt: skip
        out = [joint.head_loss_weight * terms.heads]
        if joint.hard_negative_weight > 0:
            hard = hard_negative_loss(rows.query, rows.positives, rows.cand, rows.tau, terms)
            out.append(joint.hard_negative_weight * hard)
        return out, terms.stats
