"""``silvertorch build-index``: a trained checkpoint -> one saved :class:`RetrievalModel`.

Steps: load the two-tower weights (and the OverArch / value model a joint run stored in the
checkpoint's ``extra``; fresh ones otherwise) -> run the item tower over the catalog (tqdm) ->
k-means IVF with ``joint.nlist`` lists, vectors stored in ``joint.index_dtype`` -> eligibility
(exact bitmaps / Bloom signatures, :class:`~silvertorch.index.eligibility.EligibilityConfig` "auto")
over every item attribute (MovieLens-100k: ``item_id``, ``genre``, ``year``, ``decade``) ->
assemble the model -> :func:`train.artifact.save_artifact`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from silvertorch.config import to_dict
from silvertorch.data.batching import all_items_kjt
from silvertorch.data.dataset import RecDataset
from silvertorch.index.attributes import ItemAttributes
from silvertorch.index.search import ItemIndex
from silvertorch.model import RetrievalConfig, RetrievalModel, TwoTower
from train.artifact import load_retrieval_model, save_artifact
from train.builders import build_model, load_dataset
from train.checkpoint import CheckpointError, _check_shapes, read_checkpoint
from train.config import TrainConfig, semantic_config

__all__ = [
    "embed_catalog",
    "build_item_index",
    "assemble",
    "load_towers_and_heads",
    "artifact_config",
    "build_retrieval_model",
    "build_index",
    "load_retrieval_model",
]

_TOWER_KEYS = ("data.", "model.")  # config keys that must match between checkpoint and config


@torch.no_grad()
def embed_catalog(two: TwoTower, dataset: RecDataset, *, chunk: int = 512,
                  progress: bool = False) -> torch.Tensor:
    """``(N, D) f32`` item-tower output for every item, in item-id order (eval mode, restored)."""
    was = two.training
    two.eval()
    device = two.item_probs.device
    out = []
    try:
        chunks = all_items_kjt(dataset, chunk, two.item_tower.feature_names)
        total = -(-dataset.num_items // chunk)
        for _, kjt in tqdm(chunks, total=total, disable=not progress, desc="item tower", unit="chunk"):
            out.append(two.item_embeddings(kjt.to(device)))
    finally:
        two.train(was)
    return torch.cat(out).cpu()


def build_item_index(vectors: torch.Tensor, cfg: TrainConfig,
                     attributes: ItemAttributes | None = None) -> ItemIndex:
    """IVF (``joint.nlist``, ``joint.index_dtype``, seed ``train.seed``) over ``vectors (N, D)``,
    with eligibility over ``attributes`` when given (row ``i`` = item ``i``)."""
    nlist = min(cfg.joint.nlist, vectors.shape[0])
    return ItemIndex.build(vectors, attributes=attributes, nlist=nlist,
                           dtype=cfg.joint.index_dtype, seed=cfg.train.seed)  # fmt: skip


def assemble(cfg: RetrievalConfig, two: TwoTower, index: ItemIndex, dataset: RecDataset,
             heads: dict[str, Any] | None = None) -> RetrievalModel:
    """The RetrievalModel around ``two.user_tower`` and ``index``; OverArch / value model /
    reranker loaded from ``heads`` (``{"overarch": sd, "value_model": sd, "reranker": sd}``,
    any subset) and fresh where absent."""
    model = RetrievalModel.build(cfg, two.user_tower, index, dataset.items.features)
    for name, state in (heads or {}).items():
        module = getattr(model, name, None)
        if module is None:
            raise CheckpointError(f"the checkpoint holds '{name}' but this config builds none")
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"the checkpoint's '{name}' does not fit the config: {err}") from None
    return model.eval()


def load_towers_and_heads(cfg: TrainConfig, path: str | Path,
                          dataset: RecDataset) -> tuple[TwoTower, dict[str, Any]]:
    """The two-tower model of ``path`` and the scoring heads stored with it (may be empty).

    Only the ``data.*`` / ``model.*`` config keys must agree with the checkpoint (index and
    retrieval settings may differ at build time); raises :class:`CheckpointError` otherwise.
    """
    payload = read_checkpoint(path)
    saved = {k: v for k, v in payload.get("config", {}).items() if k.startswith(_TOWER_KEYS)}
    now = {k: v for k, v in semantic_config(cfg).items() if k.startswith(_TOWER_KEYS)}
    diff = [f"{k}: checkpoint={saved.get(k, '<absent>')!r} now={now.get(k, '<absent>')!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k, "<absent>") != now.get(k, "<absent>")]
    if diff:
        raise CheckpointError(f"{path} was trained with another model/data config: " + "; ".join(diff[:8]))
    two = build_model(cfg, dataset, "cpu")
    _check_shapes(payload["model"], two, Path(path))
    two.load_state_dict(payload["model"])
    heads = dict(payload.get("extra", {}).get("heads", {}))
    return two.eval(), heads


def artifact_config(cfg: TrainConfig, dataset: RecDataset) -> dict[str, Any]:
    """The ``config`` entry of the saved file (plain values; see :mod:`train.artifact`)."""
    return {
        "retrieval": to_dict(cfg.retrieval),
        "user_tower": to_dict(cfg.model.user_tower),
        "user_cardinalities": dataset.users.cardinalities(),
        "item_cardinalities": dataset.items.cardinalities(),
        "reranker": cfg.retrieval.reranker.enabled,
    }


def artifact_meta(cfg: TrainConfig, dataset: RecDataset, checkpoint: str | Path | None) -> dict[str, Any]:
    """The ``meta`` entry: item ids / titles, user vocabularies, index parameters, provenance."""
    users = dataset.users.features.features
    return {
        "dataset": dataset.name,
        "item_raw_ids": list(dataset.items.raw_ids),
        "item_titles": list(dataset.items.titles or []),
        "user_vocab": {n: list(a.vocab) for n, a in users.items() if a.vocab is not None},
        "index": {"nlist": cfg.joint.nlist, "dtype": cfg.joint.index_dtype, "seed": cfg.train.seed},
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
    }


def build_retrieval_model(cfg: TrainConfig, checkpoint: str | Path, dataset: RecDataset, *,
                          progress: bool = True) -> tuple[RetrievalModel, TwoTower]:
    """Checkpoint -> ``(RetrievalModel in eval mode, the TwoTower it came from)``: item tower over
    the catalog, IVF + eligibility, scoring heads from the checkpoint (fresh where absent)."""
    two, heads = load_towers_and_heads(cfg, checkpoint, dataset)
    vectors = embed_catalog(two, dataset, progress=progress)
    index = build_item_index(vectors, cfg, dataset.items.features)
    return assemble(cfg.retrieval, two, index, dataset, heads), two


def build_index(cfg: TrainConfig, checkpoint: str | Path, out: str | Path, *,
                dataset: RecDataset | None = None, progress: bool = True) -> tuple[RetrievalModel, Path]:
    """Checkpoint -> RetrievalModel saved at ``out`` (the single-file format of
    :mod:`train.artifact`; ``silvertorch export`` writes the serving artifact); returns
    ``(model, path)``."""
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    model, _ = build_retrieval_model(cfg, checkpoint, dataset, progress=progress)
    path = save_artifact(out, model, artifact_config(cfg, dataset), artifact_meta(cfg, dataset, checkpoint))
    return model, path
