"""``silvertorch compare-joint``: joint training (index in the loop) vs the two-stage baseline.

Both recipes run on the same data with the same config (epochs, optimizer, K', nprobe, index);
each is evaluated through its RetrievalModel (:func:`train.joint_eval.evaluate_retrieval_model`:
Recall@K / NDCG@K of the composite ranking at k=100 with train items excluded, AUC per head), plus
the towers' own Recall@100 by exact scan for reference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from silvertorch.data.dataset import RecDataset
from train.builders import load_dataset
from train.config import TrainConfig
from train.evaluate import evaluate_model
from train.joint import JointResult, train_joint, train_two_stage
from train.joint_eval import evaluate_retrieval_model, format_joint_comparison

__all__ = ["compare_joint", "evaluate_recipe"]


def evaluate_recipe(result: JointResult, config: TrainConfig) -> dict[str, float]:
    """Composite-ranking metrics, head AUCs and the towers' exact-scan Recall@100."""
    metrics = evaluate_retrieval_model(result.scorer, result.dataset, config.eval,
                                       like_threshold=config.data.like_threshold)  # fmt: skip
    towers = evaluate_model(result.model, result.dataset, config.eval)
    metrics["towers_exact_recall@100"] = towers.get("recall@100", float("nan"))
    metrics["train_seconds"] = result.seconds
    return metrics


def compare_joint(config: TrainConfig, dataset: RecDataset | None = None,
                  ) -> tuple[dict[str, float], dict[str, float], str]:
    """``(joint metrics, two-stage metrics, text table)``; runs go to ``<out_dir>/joint`` and
    ``<out_dir>/two_stage``."""
    dataset = dataset if dataset is not None else load_dataset(config.data)
    out = Path(config.train.out_dir)

    def at(sub: str) -> TrainConfig:
        return dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(out / sub)))

    joint = evaluate_recipe(train_joint(at("joint"), dataset), config)
    two = evaluate_recipe(train_two_stage(at("two_stage"), dataset), config)
    return joint, two, format_joint_comparison(joint, two)
