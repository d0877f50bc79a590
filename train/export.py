"""Checkpoint -> the serving artifact (:mod:`silvertorch.export`): what ``silvertorch export`` runs.

Steps: :func:`train.build_index.build_retrieval_model` (towers and heads from the checkpoint, the
item tower over the catalog with a progress bar, IVF in ``joint.index_dtype`` with ``joint.nlist``
lists, eligibility over every item attribute) -> :func:`silvertorch.export.write_artifact` with
the dataset's vocabularies, raw item ids and titles -> :func:`silvertorch.export.load_artifact`
(every hash and the pairing id checked on the files just written) -> the exported programs run
against the eager modules on a sample batch (:func:`silvertorch.export.check_programs`).

:func:`export_sharded_artifact` is the same up to the model, then writes it split into item shards
(:func:`silvertorch.export_sharded.write_sharded_artifact`, for a planner plan or a shard count) and
loads every part back (hashes, pairing id, rebuild) — what ``silvertorch export --plan / --shards``
runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from silvertorch.config import to_dict
from silvertorch.data.dataset import RecDataset
from silvertorch.export import ServingArtifact, check_programs, load_artifact, write_artifact
from train.build_index import build_retrieval_model
from train.builders import load_dataset
from train.config import TrainConfig, config_hash

__all__ = ["ExportResult", "ShardedExportResult", "dataset_vocabularies", "export_artifact",
           "export_sharded_artifact", "summary", "sharded_summary"]


@dataclass
class ExportResult:
    """The loaded (verified) artifact and what was written."""

    artifact: ServingArtifact
    path: Path
    bytes: int
    tensors: int
    program_checks: dict[str, bool] = field(default_factory=dict)  # name -> equals eager


def dataset_vocabularies(dataset: RecDataset) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(user_vocab, item_vocab)``: per feature with a vocabulary, value id -> raw value string."""
    def vocab(table: Any) -> dict[str, list[str]]:
        return {n: [str(v) for v in a.vocab] for n, a in table.features.features.items() if a.vocab is not None}

    return vocab(dataset.users), vocab(dataset.items)


def _build(cfg: TrainConfig, checkpoint: str | Path, dataset: RecDataset, progress: bool) -> Any:
    """:func:`build_retrieval_model` seeded with ``train.seed`` (without touching the caller's RNG):
    scoring heads a checkpoint lacks are initialised the same way every time, so the sharded and
    the single-process export of one checkpoint hold the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_retrieval_model(cfg, checkpoint, dataset, progress=progress)


def export_artifact(cfg: TrainConfig, checkpoint: str | Path, out: str | Path, *,
                    dataset: RecDataset | None = None, progress: bool = True, overwrite: bool = False,
                    export_programs: bool = True) -> ExportResult:
    """Build the RetrievalModel of ``checkpoint`` and write it (with the item tower) at ``out``.

    Raises ``ConfigError`` (bad config), ``CheckpointError`` (unusable checkpoint),
    ``FileExistsError`` (``out`` exists and not ``overwrite``); nothing is written on failure.
    """
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    model, two = _build(cfg, checkpoint, dataset, progress)
    user_vocab, item_vocab = dataset_vocabularies(dataset)
    meta = {
        "dataset": dataset.name,
        "checkpoint": str(checkpoint),
        "config_hash": config_hash(cfg),
        "index_build": {"nlist": cfg.joint.nlist, "dtype": cfg.joint.index_dtype, "seed": cfg.train.seed},
    }
    path = write_artifact(out, model, two.item_tower, config=to_dict(cfg), user_vocab=user_vocab,
                          item_vocab=item_vocab, item_raw_ids=[str(x) for x in dataset.items.raw_ids],
                          item_titles=[str(t) for t in (dataset.items.titles or [])], extra_meta=meta,
                          export_programs=export_programs, overwrite=overwrite, progress=progress)  # fmt: skip
    artifact = load_artifact(path)
    size = sum(f["bytes"] for f in artifact.manifest["files"].values())
    checks = check_programs(artifact) if export_programs else {}
    return ExportResult(artifact, path, size, len(artifact.manifest["tensors"]), checks)


@dataclass
class ShardedExportResult:
    """The sharded artifact written (every part loaded back and verified)."""

    path: Path
    manifest: dict[str, Any]
    bytes: int


def _meta(cfg: TrainConfig, checkpoint: str | Path, dataset: RecDataset) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "checkpoint": str(checkpoint),
        "config_hash": config_hash(cfg),
        "index_build": {"nlist": cfg.joint.nlist, "dtype": cfg.joint.index_dtype, "seed": cfg.train.seed},
    }


def export_sharded_artifact(cfg: TrainConfig, checkpoint: str | Path, out: str | Path, *,
                            plan: str | Path | dict[str, Any] | None = None, num_shards: int | None = None,
                            dataset: RecDataset | None = None, progress: bool = True,
                            overwrite: bool = False) -> ShardedExportResult:
    """Build the RetrievalModel of ``checkpoint`` and write it as a sharded artifact at ``out``:
    ``plan`` (a ``sharding_plans/*.json`` path or its dict: its ``shards`` / ``replicas``) and / or
    ``num_shards``. Raises ``ValueError`` (no plan nor shard count, a plan made for another model, a
    shard count that contradicts the plan), ``ConfigError``, ``CheckpointError``,
    ``FileExistsError`` (``out`` exists and not ``overwrite``), ``ArtifactError`` (a part that
    does not load back: left at ``out`` for inspection); nothing is written on the other errors."""
    from silvertorch.export_sharded import (
        load_sharded_part,
        read_plan,
        read_sharded_manifest,
        write_sharded_artifact,
    )

    plan = read_plan(plan)  # a bad plan file fails before the (slow) model build
    if plan is None and num_shards is None:
        raise ValueError("give a plan (--plan sharding_plans/X.json) or a shard count (--shards N)")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"--shards must be >= 1, got {num_shards}")
    out = Path(out)
    if out.exists() and not overwrite:  # before the (slow) model build
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --force) to replace it")
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    model, two = _build(cfg, checkpoint, dataset, progress)
    user_vocab, item_vocab = dataset_vocabularies(dataset)
    path = write_sharded_artifact(
        out, model, two.item_tower, num_shards=num_shards, plan=plan, config=to_dict(cfg),
        user_vocab=user_vocab, item_vocab=item_vocab, item_raw_ids=[str(x) for x in dataset.items.raw_ids],
        item_titles=[str(t) for t in (dataset.items.titles or [])], extra_meta=_meta(cfg, checkpoint, dataset),
        overwrite=overwrite, progress=progress)  # fmt: skip
    from tqdm.auto import tqdm

    manifest = read_sharded_manifest(path)
    shards = int(manifest["shards"])
    for rank in tqdm(range(shards), desc="verify parts", disable=not progress):
        load_sharded_part(path, rank=rank, world_size=shards, verify=True)
    size = sum(int(f["bytes"]) for f in manifest["files"].values())
    return ShardedExportResult(path, manifest, size)


def sharded_summary(result: ShardedExportResult) -> str:
    """Human-readable lines about a sharded artifact."""
    m = result.manifest
    a = m["assignment"]
    plan = m.get("plan_sha256")
    return "\n".join([
        f"wrote {result.path}",
        f"  version    {m['version_id']}",
        f"  pairing    {m['pairing_id'][:16]}",
        f"  shards     {m['shards']} (replicas up to {m['replicas']}, plan "
        f"{plan[:12] if plan else 'none'})",
        f"  items      {sum(a['items_per_shard'])} per shard {a['items_per_shard']}, fresh owner "
        f"{a['fresh_owner']}",
        f"  bytes      {result.bytes:,} in {len(m['files'])} files (+ manifest.json)",
        f"  serve      silvertorch serve {result.path}   (starts {m['shards']} ranks)",
    ])


def summary(result: ExportResult) -> str:
    """Human-readable lines about an exported artifact."""
    m = result.artifact.manifest
    idx = m["index"]
    def status(name: str, prog: dict[str, Any]) -> str:
        if "file" not in prog:
            return f"not exported ({prog['error'][:80]})"
        same = result.program_checks.get(name)
        return "ok" + ("" if same is None else ", equals eager" if same else ", DIFFERS from eager")

    progs = ", ".join(f"{n}: {status(n, p)}" for n, p in m["programs"].items()) or "none"
    return "\n".join([
        f"wrote {result.path}",
        f"  version    {m['version_id']}",
        f"  pairing    {m['pairing_id'][:16]}",
        f"  items      {idx['num_items']} (slots {idx['slots']}, nlist {idx['nlist']}, {idx['dtype']}, "
        f"dim {idx['dim']}, eligibility {'yes' if idx['eligibility'] else 'no'})",
        f"  tensors    {result.tensors}",
        f"  bytes      {result.bytes:,} in {len(m['files'])} files (+ manifest.json)",
        f"  programs   {progs}",
    ])
