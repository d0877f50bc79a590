"""The demo's second half: the built RetrievalModel answering requests, and the index's recall.

- :func:`describe_retrieval`: one user's request (raw features -> :class:`~train.queries.QueryBuilder`
  -> KJT) through the loaded :class:`~silvertorch.model.RetrievalModel`, unfiltered and with a
  filter expression, train items excluded (:func:`train.joint_eval.retrieve_unseen`): titles,
  composite, per-task and retrieval scores; plus a filter that matches nothing.
- :func:`ivf_recall`: the fraction of the exact top-``k`` ids (fp32 scan of the item-tower vectors)
  that the IVF index returns at its nprobe (and, for reference, the exact int8 scan), same queries.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from silvertorch.data.dataset import RecDataset
from silvertorch.index.search import SearchParams
from silvertorch.model import RetrievalModel, RetrievalOutput
from train.build_index import build_index, embed_catalog, load_retrieval_model, load_towers_and_heads
from train.config import TrainConfig
from train.evaluate import user_embeddings
from train.joint_eval import evaluate_retrieval_model, retrieve_unseen
from train.queries import QueryBuilder

__all__ = ["user_request", "describe_retrieval", "ivf_recall", "overlap", "retrieval_report"]

NO_MATCH_FILTER = "genre:Comedy AND NOT genre:Comedy"


def user_request(dataset: RecDataset, user: int) -> dict[str, list[str]]:
    """The raw feature values (vocabulary names) of dense user ``user``: what a client would send."""
    req = {}
    for name, attr in dataset.users.features.features.items():
        vals = attr.values[attr.offsets[user] : attr.offsets[user + 1]].tolist()
        req[name] = [attr.vocab[v] if attr.vocab else str(v) for v in vals]
    return req


def _lines(model: RetrievalModel, dataset: RecDataset, out: RetrievalOutput, held_out: set[int]) -> list[str]:
    titles = dataset.items.titles or [f"item {i}" for i in dataset.items.raw_ids]
    tasks = model.overarch.tasks
    rows = []
    for r, (i, s) in enumerate(zip(out.ids[0].tolist(), out.scores[0].tolist())):
        if i < 0:
            break
        per = " ".join(f"{t}={p:.3f}" for t, p in zip(tasks, out.task_scores[0, r].tolist()))
        mark = "*" if i in held_out else " "
        rows.append(f"    {r + 1:>2}. {mark} {titles[i][:46]:<46} composite {s:.3f}  {per}  "
                    f"ann {out.retrieval_scores[0, r]:.3f}")  # fmt: skip
    return rows or ["    (no results)"]


@torch.no_grad()
def describe_retrieval(model: RetrievalModel, dataset: RecDataset, user: int, vocab: dict[str, list[str]],
                       filters: list[str], k: int = 10) -> str:
    """Requests of one user through ``model`` (see the module docstring); returns the text."""
    builder = QueryBuilder(vocab, model.user_tower.feature_names)
    kjt = builder.build([user_request(dataset, user)])
    users = torch.tensor([user])
    seen = dataset.train_seen()
    held_out = set(dataset.test_positives().of(user).tolist())
    lines = [f"RetrievalModel for user {dataset.users.raw_ids[user]} (train items excluded, "
             f"* = held out; composite = value model over task probabilities):"]  # fmt: skip
    for expr in [None, *filters]:
        out, _, _ = retrieve_unseen(model, kjt, users, seen, k, [expr] if expr else None)
        lines.append(f"  filter: {expr or '(none)'}")
        lines.extend(_lines(model, dataset, out, held_out))
    out = model.retrieve(kjt, k, [NO_MATCH_FILTER])
    empty = bool((out.ids == -1).all()) and bool(torch.isinf(out.scores).all())
    lines.append(f"  filter: {NO_MATCH_FILTER} -> {int((out.ids >= 0).sum())} results, ids shape "
                 f"{tuple(out.ids.shape)}, all padding (-1 / -inf): {empty}")  # fmt: skip
    return "\n".join(lines)


def overlap(found: Tensor, truth: Tensor) -> float:
    """Mean over rows of ``|found ∩ truth| / |truth|`` for ``(B, k) int64`` id blocks (-1 ignored)."""
    hit = (found[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)
    return float((hit.any(1).sum(1).float() / (truth >= 0).sum(1).clamp_min(1).float()).mean())


@torch.no_grad()
def ivf_recall(model: RetrievalModel, queries: Tensor, item_vectors: Tensor, k: int = 100,
               nprobe: int | None = None) -> dict[str, float]:
    """``queries (B, D)``, ``item_vectors (N, D) f32`` (item-id order, the tower's output) ->
    recall@k of the IVF search and of the exact scan of the stored vectors against the exact fp32
    top-``k``."""
    nprobe = nprobe or model.config.nprobe
    k = min(k, item_vectors.shape[0])
    truth = torch.topk(queries @ item_vectors.T, k, dim=1).indices
    _, ivf = model.index.search(queries, k, SearchParams(nprobe=nprobe))
    _, flat = model.index.search(queries, k, SearchParams(exact=True))
    dtype = str(model.index.ivf.storage_dtype).replace("torch.", "")
    return {f"ivf_{dtype}_nprobe{nprobe}": overlap(ivf, truth), f"exact_{dtype}": overlap(flat, truth)}


def retrieval_report(config: TrainConfig, checkpoint: Path, dataset: RecDataset, user: int,
                     filters: list[str], *, compare: bool = False) -> str:
    """Build the RetrievalModel from ``checkpoint`` (saved next to it), load it back, and report:
    one user's requests, the composite ranking's held-out metrics, the index's recall; with
    ``compare`` the joint-vs-two-stage table (trains the baseline: minutes)."""
    t0 = time.perf_counter()
    out = Path(checkpoint).parent / "retrieval_model.pt"
    _, path = build_index(config, checkpoint, out, dataset=dataset, progress=config.train.progress)
    model, meta = load_retrieval_model(path)
    built = time.perf_counter() - t0
    ivf = model.index.ivf
    lines = [
        f"built {path} in {built:.1f}s: {ivf.ntotal} items, nlist {ivf.nlist}, "
        f"{meta['index']['dtype']} vectors, eligibility over {sorted(dataset.items.feature_names)}",
        "",
        describe_retrieval(model, dataset, user, meta["user_vocab"], filters),
        "",
    ]
    two, _ = load_towers_and_heads(config, checkpoint, dataset)
    vectors = embed_catalog(two, dataset)
    queries = user_embeddings(two, dataset)(torch.arange(dataset.num_users))
    rec = ivf_recall(model, queries, vectors, k=100)
    lines.append(f"index recall@100 vs exact fp32 scan ({dataset.num_users} user queries): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in rec.items()))  # fmt: skip
    metrics = evaluate_retrieval_model(model, dataset, config.eval, like_threshold=config.data.like_threshold)
    lines += ["", "RetrievalModel held-out metrics (composite ranking, k=100, train items excluded; "
              "AUC per task head on test items vs retrieved non-interacted items):",
              "  " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())]  # fmt: skip
    if compare:
        from train.compare_joint import compare_joint

        lines += ["", "joint vs two-stage (same config, same data):", compare_joint(config, dataset)[2]]
    return "\n".join(lines)
