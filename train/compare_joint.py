"""``silvertorch compare-joint``: joint training (index in the loop) vs the two-stage baseline.

Both recipes run on the same data with the same config (epochs, optimizer, K', nprobe, index) and
the same seed; each is evaluated through its RetrievalModel
(:func:`train.joint_eval.evaluate_retrieval_model`: Recall@K / NDCG@K of the composite ranking at
k=100 with train items excluded, AUC per head), plus the towers' own Recall@100 by exact scan for
reference. With several seeds (:func:`compare_joint_seeds`) every seed trains both recipes and the
table reports mean ± sample standard deviation over seeds and the paired difference.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

from silvertorch.data.dataset import RecDataset
from train.builders import load_dataset
from train.config import TrainConfig
from train.evaluate import evaluate_model
from train.joint import JointResult, train_joint, train_two_stage
from train.joint_eval import evaluate_retrieval_model, format_joint_comparison

__all__ = ["compare_joint", "compare_joint_seeds", "evaluate_recipe", "mean_std", "format_seed_comparison"]


def evaluate_recipe(result: JointResult, config: TrainConfig) -> dict[str, float]:
    """Composite-ranking metrics, head AUCs and the towers' exact-scan Recall@100."""
    metrics = evaluate_retrieval_model(result.scorer, result.dataset, config.eval,
                                       like_threshold=config.data.like_threshold)  # fmt: skip
    towers = evaluate_model(result.model, result.dataset, config.eval)
    metrics["towers_exact_recall@100"] = towers.get("recall@100", float("nan"))
    metrics["train_seconds"] = result.seconds
    return metrics


def _with(config: TrainConfig, out_dir: Path, seed: int | None = None) -> TrainConfig:
    loop = dataclasses.replace(config.train, out_dir=str(out_dir))
    if seed is not None:
        loop = dataclasses.replace(loop, seed=seed)
    return dataclasses.replace(config, train=loop)


def compare_joint(config: TrainConfig, dataset: RecDataset | None = None,
                  ) -> tuple[dict[str, float], dict[str, float], str]:
    """``(joint metrics, two-stage metrics, text table)`` at ``train.seed``; runs go to
    ``<out_dir>/joint`` and ``<out_dir>/two_stage``."""
    dataset = dataset if dataset is not None else load_dataset(config.data)
    out = Path(config.train.out_dir)
    joint = evaluate_recipe(train_joint(_with(config, out / "joint"), dataset), config)
    two = evaluate_recipe(train_two_stage(_with(config, out / "two_stage"), dataset), config)
    return joint, two, format_joint_comparison(joint, two)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def format_seed_comparison(joint: list[dict[str, float]], two: list[dict[str, float]],
                           seeds: Sequence[int]) -> str:
    """A text table over seeds: metric | joint mean ± sd | two-stage mean ± sd | paired diff mean
    ± sd | seeds where joint >= two-stage."""
    if not joint or len(joint) != len(two) or len(joint) != len(seeds):
        raise ValueError(f"one joint and one two-stage result per seed, got {len(joint)}, {len(two)} "
                         f"for seeds {list(seeds)}")  # fmt: skip
    head = f"{'metric':<26}{'joint':>18}{'two-stage':>18}{'diff (paired)':>20}{'joint>=':>9}"
    lines = [f"seeds {list(seeds)}: mean ± sd", head, "-" * len(head)]
    for key in joint[0]:
        a = [m[key] for m in joint]
        b = [m.get(key, float("nan")) for m in two]
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        md, sd = mean_std([x - y for x, y in zip(a, b)])
        wins = sum(x >= y for x, y in zip(a, b))
        lines.append(f"{key:<26}{ma:>11.4f} ± {sa:.4f}{mb:>11.4f} ± {sb:.4f}{md:>+13.4f} ± {sd:.4f}"
                     f"{wins:>6}/{len(a)}")  # fmt: skip
    return "\n".join(lines)


def compare_joint_seeds(config: TrainConfig, seeds: Sequence[int], dataset: RecDataset | None = None,
                        ) -> tuple[list[dict[str, float]], list[dict[str, float]], str]:
    """Both recipes at every seed in ``seeds`` (``train.seed`` replaced); runs go to
    ``<out_dir>/seed<s>/{joint,two_stage}``. Returns per-seed metrics of each recipe and the table
    of :func:`format_seed_comparison`."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct integers >= 0, got {seeds}")
    dataset = dataset if dataset is not None else load_dataset(config.data)
    out = Path(config.train.out_dir)
    joint, two = [], []
    for s in seeds:
        cfg = _with(config, out / f"seed{s}", s)
        j, t, _ = compare_joint(cfg, dataset)
        joint.append(j)
        two.append(t)
    return joint, two, format_seed_comparison(joint, two, seeds)
