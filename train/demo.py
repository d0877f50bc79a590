"""The demo: train (jointly, with the index in the loop, when ``joint.enabled``), compare with
popularity, show one user's recommendations, then build the RetrievalModel from the checkpoint and
answer that user's requests through it (filters, per-task scores, the index's recall)."""

from __future__ import annotations

import time

import torch

from silvertorch.data.dataset import RecDataset
from silvertorch.model import TwoTower
from train.config import TrainConfig
from train.evaluate import compare_with_popularity, item_embeddings, user_embeddings
from train.loop import train

__all__ = ["recommend", "describe_user", "pick_demo_user", "run_demo"]


@torch.no_grad()
def recommend(
    model: TwoTower, dataset: RecDataset, user: int, k: int = 10
) -> tuple[list[int], list[float]]:
    """Top-``k`` unseen items of dense user index ``user``: ``(item indices, scores)``."""
    model.eval()
    items = item_embeddings(model, dataset)
    scores = (user_embeddings(model, dataset)(torch.tensor([user])) @ items.T)[0]
    scores[dataset.train_seen().of(user)] = float("-inf")
    top = torch.topk(scores, k)
    return top.indices.tolist(), top.values.tolist()


def pick_demo_user(dataset: RecDataset, raw_id: str | None = None) -> int:
    """Dense index of ``raw_id``; by default the first user with at least 5 held-out items."""
    if raw_id is not None:
        try:
            return dataset.users.raw_ids.index(raw_id)
        except ValueError:
            raise ValueError(f"user '{raw_id}' is not in {dataset.name}") from None
    counts = dataset.test_positives().lengths()
    candidates = torch.nonzero(counts >= 5).squeeze(1)
    if candidates.numel() == 0:
        candidates = torch.nonzero(counts > 0).squeeze(1)
    return int(candidates[0])


def _title(dataset: RecDataset, item: int) -> str:
    titles = dataset.items.titles
    return titles[item] if titles is not None else f"item {dataset.items.raw_ids[item]}"


def describe_user(model: TwoTower, dataset: RecDataset, user: int, k: int = 10) -> str:
    """Profile, recent train history, held-out items and top-``k`` recommendations (``*`` marks
    a recommendation the user went on to rate in the held-out period)."""
    feats = dataset.users.features
    profile = []
    for name, attr in feats.features.items():
        if name.endswith("_id"):
            continue
        vals = attr.values[attr.offsets[user] : attr.offsets[user + 1]].tolist()
        names = [attr.vocab[v] if attr.vocab else str(v) for v in vals]
        profile.append(f"{name}={'/'.join(names)}")
    train = dataset.train.select(dataset.train.user == user)
    recent = torch.argsort(train.timestamp, descending=True, stable=True)[:5]
    test_items = set(dataset.test_positives().of(user).tolist())
    ids, scores = recommend(model, dataset, user, k)
    lines = [
        f"user {dataset.users.raw_ids[user]} ({', '.join(profile)}): "
        f"{len(train)} train ratings, {len(test_items)} held out",
        "  most recent in train:",
        *[
            f"    {_title(dataset, int(train.item[i]))}  rated {train.rating[i]:.0f}"
            for i in recent
        ],
        "  held out (what they rated next):",
        *[f"    {_title(dataset, i)}" for i in sorted(test_items)[:10]],
        f"  top-{k} recommendations (* = in the held-out set):",
        *[
            f"    {r + 1:>2}. {'*' if i in test_items else ' '} {_title(dataset, i)}  ({s:.3f})"
            for r, (i, s) in enumerate(zip(ids, scores))
        ],
    ]
    hits = sum(i in test_items for i in ids)
    lines.append(f"  {hits} of the top-{k} are held-out items of this user")
    return "\n".join(lines)


DEMO_FILTER = "genre:Comedy AND NOT decade:1990s"


def run_demo(config: TrainConfig, user: str | None = None, resume: bool = False,
             compare: bool = False) -> str:
    """Train, evaluate against popularity, describe one user, build the RetrievalModel and query
    it; with ``compare`` also the joint-vs-two-stage table. Returns the printed report."""
    from train.demo_retrieval import retrieval_report

    start = time.perf_counter()
    if config.joint.enabled:
        from train.joint import train_joint

        if resume:
            from silvertorch.config import ConfigError

            raise ConfigError("joint.enabled", "a joint run does not resume; set joint.enabled=false")
        result = train_joint(config)
        how = f"jointly with the index in the loop ({result.index_builds} index builds)"
    else:
        result = train(config, resume=resume)
        how = f"two-tower only ({result.epoch} epochs)"
    ours, base, table = compare_with_popularity(result.model, result.dataset, config.eval)
    dense_user = pick_demo_user(result.dataset, user)
    report = [
        result.dataset.summary(),
        f"trained {result.step} steps {how} in {result.seconds:.1f}s; "
        f"checkpoint {result.checkpoint}",
        "",
        "held-out evaluation (exact scan of all items, train items excluded; "
        "Recall@K = hits in top-K / held-out items of the user, averaged over users):",
        table,
        "",
        describe_user(result.model, result.dataset, dense_user),
        "",
        retrieval_report(config, result.checkpoint, result.dataset, dense_user, [DEMO_FILTER],
                         compare=compare),
        "",
        f"demo finished in {time.perf_counter() - start:.1f}s",
    ]
    return "\n".join(report)
