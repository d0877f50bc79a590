"""The retrieval-model file: ``torch.save({"state_dict", "config", "meta"})``, written atomically.

A simple, correct stand-in for the export of a later issue. ``config`` holds plain values only:
``retrieval`` (the :class:`~silvertorch.model.RetrievalConfig` as a dict), ``user_tower`` (its
:class:`~silvertorch.modules.towers.TowerConfig`), ``user_cardinalities`` and
``item_cardinalities`` (feature -> vocabulary size), ``reranker`` (bool). ``meta`` holds what a
caller needs around the model: item raw ids and titles, user feature vocabularies, the index
build parameters and the source checkpoint. :func:`load_retrieval_model` rebuilds the module
skeleton from ``config`` and loads ``state_dict`` strictly (buffers take the saved sizes).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from silvertorch.config import from_dict
from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.search import ItemIndex
from silvertorch.model import RetrievalConfig, RetrievalModel
from silvertorch.modules.overarch import OverArch
from silvertorch.modules.reranker import Reranker
from silvertorch.modules.towers import TowerConfig, UserTower
from silvertorch.modules.value_model import ValueModel
from train.atomic import atomic_write

__all__ = ["ARTIFACT_VERSION", "save_artifact", "read_artifact", "load_retrieval_model"]

ARTIFACT_VERSION = 1


def save_artifact(path: str | Path, model: RetrievalModel, config: dict[str, Any],
                  meta: dict[str, Any]) -> Path:
    """Write ``{"state_dict", "config", "meta", "version"}`` to ``path`` atomically (temporary file
    in the same directory, fsync, rename): a crash never leaves a half-written model behind."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"version": ARTIFACT_VERSION, "state_dict": model.state_dict(), "config": config,
                "meta": meta}, buf)  # fmt: skip
    return atomic_write(path, buf.getvalue())


def read_artifact(path: str | Path) -> dict[str, Any]:
    """The saved dict (``weights_only`` load); ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"retrieval model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ValueError(f"{path} is not a readable retrieval model: {err}") from None
    if not isinstance(payload, dict) or payload.get("version") != ARTIFACT_VERSION:
        raise ValueError(f"{path} is not a SilverTorch retrieval model (version {ARTIFACT_VERSION})")
    for key in ("state_dict", "config", "meta"):
        if key not in payload:
            raise ValueError(f"{path} lacks '{key}'")
    return payload


def _placeholder_attributes(num_items: int, names: list[str], cards: dict[str, int]) -> ItemAttributes:
    """Empty attribute sets of the right names / sizes; the real tables come from the state dict."""
    empty = [[] for _ in range(num_items)]
    return ItemAttributes(num_items, {n: Attribute.from_lists(n, empty, cards[n]) for n in names})


def load_retrieval_model(path: str | Path) -> tuple[RetrievalModel, dict[str, Any]]:
    """``(model in eval mode, meta)`` from a file written by :func:`save_artifact`."""
    payload = read_artifact(path)
    cfg, state = payload["config"], payload["state_dict"]
    rcfg = from_dict(RetrievalConfig, cfg["retrieval"])
    user_tower = UserTower(from_dict(TowerConfig, cfg["user_tower"]), cfg["user_cardinalities"])
    index = ItemIndex.from_state_dict(
        {k[len("index."):]: v for k, v in state.items() if k.startswith("index.")}
    )
    dim = index.ivf.dim
    item_cards = dict(cfg["item_cardinalities"])
    overarch = OverArch(rcfg.overarch, dim, item_cards)
    reranker = Reranker(rcfg.reranker, dim, overarch.num_tasks) if cfg.get("reranker") else None
    num_items = int(state["item_slot"].shape[0])
    attrs = _placeholder_attributes(num_items, overarch.feature_names, item_cards)
    model = RetrievalModel(user_tower, index, overarch, ValueModel(rcfg.value_model), reranker,
                           attrs, rcfg)  # fmt: skip
    model.load_state_dict(state, strict=True)
    return model.eval(), payload["meta"]
