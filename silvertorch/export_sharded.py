"""The sharded serving artifact: one directory, one part per item shard, the plan, ONE manifest.

Layout (format ``silvertorch-sharded-artifact``, :data:`FORMAT_VERSION`)::

    manifest.json     format, version id, creation time, code version, the module config, the
                      shard assignment (cluster owners, fresh-segment owner, global slot layout),
                      shards / replicas, the plan's sha256, the pairing id, the sha256 / shape /
                      dtype of every tensor of every part and the sha256 / size of every file
    plan.json         the placement plan it was exported for (``silvertorch plan``), when one was given
    common.pt         replicated state: {"model": user tower, OverArch, value model, reranker,
                      item_feature_*, global_offsets, catalog_generation; "item_tower": ...}
    part-00000.pt     shard 0: {"index": the shard's ItemIndex state, "item_slot": (N,) int64}
    part-00001.pt     ...
    vocab.json        as the single-process artifact (silvertorch.export)
    items.json        as the single-process artifact

Written like :func:`silvertorch.export.write_artifact` (same hashing, fsync, temp dir + rename:
a reader never sees a half-written artifact). **Rank ``r`` of a world of ``W`` ranks** loads
only ``common.pt`` and ``part-{r % shards}.pt`` (:func:`load_sharded_part`), verifies their hashes
and the pairing id (the user tower with *all* parts' index tensors, as recorded in the manifest), and
refuses, naming the mismatch: a world size that is not ``g * shards`` with ``1 <= g <= replicas``,
a plan other than the one exported (sha256 and shard counts shown), a corrupt or modified file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from silvertorch.config import from_dict
from silvertorch.distributed.sharded_index import ShardAssignment, assign_clusters, shard_index
from silvertorch.distributed.sharded_retrieval import ShardedRetrievalModel
from silvertorch.export import (
    ArtifactError,
    _check_vocab,
    _feature_rows,
    _file_sha256,
    _write_file,
    manifest_head,
    model_config,
    publish_directory,
    write_catalog_files,
    tensor_sha256,
)
from silvertorch.index.search import ItemIndex
from silvertorch.model import RetrievalConfig, RetrievalModel
from silvertorch.modules.overarch import OverArch
from silvertorch.modules.reranker import Reranker
from silvertorch.modules.towers import ItemTower, TowerConfig, UserTower
from silvertorch.modules.value_model import ValueModel

__all__ = [
    "SHARDED_FORMAT",
    "FORMAT_VERSION",
    "ShardedPart",
    "write_sharded_artifact",
    "load_sharded_part",
    "read_sharded_manifest",
    "read_plan",
    "plan_sha256",
    "world_layout",
]

SHARDED_FORMAT = "silvertorch-sharded-artifact"
FORMAT_VERSION = 1
MANIFEST, PLAN, COMMON, VOCAB, ITEMS = "manifest.json", "plan.json", "common.pt", "vocab.json", "items.json"
_PART_KEYS = ("index.", "item_slot")  # ShardedRetrievalModel state entries that differ per shard


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.pt"


def plan_sha256(plan: Mapping[str, Any]) -> str:
    """sha256 of a plan's canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _plan_dict(plan: Any) -> dict[str, Any] | None:
    """A ``Plan`` object, a dict or a JSON file path -> the plan dict (None stays None)."""
    if plan is None:
        return None
    if isinstance(plan, (str, Path)):
        p = Path(plan)
        if not p.is_file():
            raise ValueError(f"plan file not found: {p}")
        try:
            plan = json.loads(p.read_text())
        except ValueError as err:
            raise ValueError(f"{p}: not a JSON plan ({err})") from None
    elif hasattr(plan, "to_dict"):
        plan = plan.to_dict()
    if not isinstance(plan, dict) or not isinstance(plan.get("shards"), int) or plan["shards"] < 1:
        raise ValueError("a plan must be a JSON object with an integer 'shards' >= 1 (silvertorch plan)")
    return json.loads(json.dumps(plan))  # plain JSON values (tuples -> lists, as read back)


def read_plan(plan: Any) -> dict[str, Any] | None:
    """A plan (``Plan``, dict or ``sharding_plans/*.json`` path) as its JSON dict; ``ValueError``
    naming what is wrong (missing file, not JSON, no integer ``shards`` >= 1). None stays None."""
    return _plan_dict(plan)


def world_layout(world_size: int, shards: int, replicas: int) -> tuple[int, int]:
    """``(groups, shards)``; raises ``ValueError`` unless ``world_size = g * shards``,
    ``1 <= g <= replicas`` (rank ``r`` holds shard ``r % shards`` in replica group ``r // shards``)."""
    g, rest = divmod(world_size, shards)
    if world_size < 1 or rest or not 1 <= g <= replicas:
        raise ValueError(f"world size {world_size} does not fit the artifact: {shards} shard(s) x up to "
                         f"{replicas} replica(s) needs a multiple of {shards} up to {shards * replicas}")
    return g, shards


def _check_plan_fits(plan: dict[str, Any], model: RetrievalModel, num_shards: int) -> None:
    """The plan was made for this model and shard count (names every mismatch)."""
    problems = []
    if plan["shards"] != num_shards:
        problems.append(f"shards: the plan has {plan['shards']}, num_shards={num_shards}")
    ivf = model.index.ivf
    want = plan.get("model") or {}
    have = {"dim": ivf.dim, "nlist": ivf.nlist,
            "index_dtype": str(ivf.storage_dtype).removeprefix("torch.").replace("bfloat16", "bf16")
            .replace("float32", "fp32").replace("float16", "fp16")}
    for key, value in have.items():
        if key in want and str(want[key]) != str(value):
            problems.append(f"{key}: the plan was made for {want[key]}, the model has {value}")
    if problems:
        raise ValueError("plan does not match the model: " + "; ".join(problems))


# ------------------------------------------------------------------------------------ writing
def _sharded_state(model: RetrievalModel, shards: list[ItemIndex], a: ShardAssignment
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(common state, per-part states) of the :class:`ShardedRetrievalModel` of every shard:
    entries under ``index.`` and ``item_slot`` differ per shard, the rest is replicated."""
    common: dict[str, Any] = {}
    parts: list[dict[str, Any]] = []
    for r, shard in enumerate(shards):
        sm = ShardedRetrievalModel.from_model(model, shard, a, rank=r)
        part: dict[str, Any] = {}
        for k, v in sm.state_dict().items():
            v = v.detach().cpu().contiguous() if isinstance(v, Tensor) else v
            if k.startswith(_PART_KEYS):
                part[k] = v
            elif r == 0:
                common[k] = v
        parts.append(part)
    return common, parts


def write_sharded_artifact(
    out: str | Path,
    model: RetrievalModel,
    item_tower: ItemTower,
    *,
    num_shards: int | None = None,
    plan: Any = None,
    config: dict[str, Any] | None = None,
    user_vocab: Mapping[str, Sequence[str]],
    item_vocab: Mapping[str, Sequence[str]],
    item_raw_ids: Sequence[str],
    item_titles: Sequence[str] = (),
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``model`` split into item shards as one sharded artifact directory at ``out``.

    ``plan``: a planner ``Plan``, its dict or a ``sharding_plans/*.json`` path; its ``shards`` sets
    the number of parts (and ``replicas`` how many copies of the shard set a launch may run), and
    it must match the model (``dim``, ``nlist``, ``index_dtype`` when it records them).
    ``num_shards``: the number of parts without a plan (or the same number as the plan's).
    The other arguments are those of :func:`silvertorch.export.write_artifact`.
    Raises ``ValueError`` on inconsistent inputs (nothing is written then), ``FileExistsError``
    when ``out`` exists and not ``overwrite``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --force) to replace it")
    pdict = _plan_dict(plan)
    if pdict is None and num_shards is None:
        raise ValueError("give a plan (with its 'shards') or num_shards")
    shards_n = int(pdict["shards"]) if pdict is not None else int(num_shards)  # type: ignore[arg-type]
    if num_shards is not None and num_shards != shards_n:
        raise ValueError(f"num_shards={num_shards} but the plan has {shards_n} shards")
    if shards_n < 1:
        raise ValueError(f"num_shards must be >= 1, got {shards_n}")
    if pdict is not None:
        _check_plan_fits(pdict, model, shards_n)
    replicas = int(pdict.get("replicas", 1)) if pdict is not None else 1
    if len(item_raw_ids) > model.num_items:
        raise ValueError(f"item_raw_ids has {len(item_raw_ids)} entries, the model's id space only "
                         f"{model.num_items} items")
    if item_titles and len(item_titles) != len(item_raw_ids):
        raise ValueError(f"item_titles has {len(item_titles)} entries, expected 0 or {len(item_raw_ids)}")
    uvocab = _check_vocab("user", user_vocab, _feature_rows(model.user_tower))
    ivocab = _check_vocab("item", item_vocab, {**_feature_rows(item_tower), **model.overarch.cardinalities})
    cfg = model_config(model, item_tower)
    cfg["run"] = config or {}
    json.dumps({"config": cfg, "meta": extra_meta})  # TypeError on non-JSON values, before writing

    bar = tqdm(total=shards_n + 2, desc=f"write {out.name}", unit="part", leave=False, disable=not progress)
    modes = (model.training, item_tower.training)
    model.eval()
    item_tower.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        a = assign_clusters(model.index, shards_n)
        shards = []
        for r in range(shards_n):
            shards.append(shard_index(model.index, a, r))
            bar.update(1)
        common, parts = _sharded_state(model, shards, a)
        item_state = {k: v.detach().cpu().contiguous() for k, v in item_tower.state_dict().items()}
        tensors: dict[str, dict[str, Any]] = {}

        def record(prefix: str, state: Mapping[str, Any]) -> None:
            for k, v in state.items():
                if isinstance(v, Tensor):
                    tensors[f"{prefix}/{k}"] = {"sha256": tensor_sha256(v), "shape": list(v.shape),
                                                "dtype": str(v.dtype).removeprefix("torch.")}

        record("common/model", common)
        record("common/item_tower", item_state)
        _save(tmp / COMMON, {"model": common, "item_tower": item_state})
        for r, part in enumerate(parts):
            record(f"{part_name(r)[:-3]}/model", part)
            _save(tmp / part_name(r), {"model": part})
        bar.update(1)
        write_catalog_files(tmp, uvocab, ivocab, item_raw_ids, item_titles)
        if pdict is not None:
            _write_file(tmp / PLAN, (json.dumps(pdict, indent=2, sort_keys=True) + "\n").encode())
        manifest = {
            **manifest_head(SHARDED_FORMAT, FORMAT_VERSION, tmp, cfg, model),
            "shards": shards_n,
            "replicas": replicas,
            "plan_sha256": plan_sha256(pdict) if pdict is not None else None,
            "assignment": {"cluster_owner": a.cluster_owner.tolist(), "fresh_owner": a.fresh_owner,
                           "global_offsets": a.global_offsets.tolist(),
                           "items_per_shard": list(a.items_per_shard)},
            "parts": [{"shard": r, "file": part_name(r), "items": int(s.ivf.ntotal),
                       "slots": int(s.ivf.num_slots)} for r, s in enumerate(shards)],
            "pairing_id": _pairing(tensors),
            "tensors": tensors,
            "meta": extra_meta or {},
        }
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        publish_directory(tmp, out)
        bar.update(1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        model.train(modes[0])
        item_tower.train(modes[1])
    return out


def _save(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _pairing(tensors: Mapping[str, Mapping[str, Any]]) -> str:
    """Hash over the user tower's tensors and every part's index vectors / scales / layout."""
    names = sorted(n for n in tensors if n.startswith("common/model/user_tower."))
    paired = ("vectors", "scales", "slot_ids", "centroids", "cluster_offsets")
    names += sorted(n for n in tensors
                    if n.startswith("part-") and any(n.endswith(f"/model/index.ivf.{b}") for b in paired))
    if not any(n.startswith("common/") for n in names) or not any(n.startswith("part-") for n in names):
        raise ArtifactError("a sharded artifact needs user tower and index tensors to pair")
    return hashlib.sha256("\n".join(f"{n}={tensors[n]['sha256']}" for n in names).encode()).hexdigest()


# ------------------------------------------------------------------------------------ reading
@dataclass
class ShardedPart:
    """What one rank loads: its :class:`ShardedRetrievalModel` (eval, CPU), the item tower (for
    upserts by features), the manifest, vocabularies and raw ids, its shard and replica group."""

    model: ShardedRetrievalModel
    item_tower: ItemTower
    manifest: dict[str, Any]
    user_vocab: dict[str, list[str]]
    item_vocab: dict[str, list[str]]
    item_raw_ids: list[str]
    item_titles: list[str]
    shard: int
    replica: int
    path: Path

    @property
    def version(self) -> str:
        return str(self.manifest["version_id"])


def read_sharded_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest at ``path`` after checking format, format version and the required fields."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: no sharded artifact there (missing {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{mpath}: corrupt manifest (not JSON: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{mpath}: not a '{SHARDED_FORMAT}' manifest (format={got!r}); a "
                            "single-process artifact is served by `silvertorch serve` without ranks")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version {manifest.get('format_version')!r} is incompatible "
                            f"with this code (expects {FORMAT_VERSION}); re-export the artifact")
    for key, typ in (("shards", int), ("replicas", int), ("assignment", dict), ("parts", list),
                     ("tensors", dict), ("files", dict), ("config", dict), ("pairing_id", str)):
        if not isinstance(manifest.get(key), typ):
            raise ArtifactError(f"{mpath}: manifest lacks '{key}' (a {typ.__name__})")
    for name in manifest["files"]:
        if Path(name).name != name or name in (".", ".."):
            raise ArtifactError(f"{mpath}: bad file entry {name!r}")
    return manifest


def _verify_file(path: Path, name: str, manifest: dict[str, Any]) -> None:
    info = manifest["files"].get(name)
    if info is None:
        raise ArtifactError(f"{path}: manifest lists no '{name}'")
    f = path / name
    if not f.is_file():
        raise ArtifactError(f"{path}: missing file '{name}' listed in the manifest")
    if f.stat().st_size != info.get("bytes"):
        raise ArtifactError(f"{f}: {f.stat().st_size} bytes, the manifest says {info.get('bytes')} "
                            "(truncated or modified)")
    if _file_sha256(f) != info.get("sha256"):
        raise ArtifactError(f"{f}: sha256 mismatch with the manifest (corrupt or modified)")


def _load(path: Path, name: str) -> dict[str, Any]:
    try:
        state = torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ArtifactError(f"{path / name}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ArtifactError(f"{path / name}: expected a dict with a 'model' entry")
    return state


def _verify_tensors(path: Path, prefix: str, state: Mapping[str, Any], manifest: dict[str, Any]) -> None:
    want = {n[len(prefix) + 1:]: i for n, i in manifest["tensors"].items() if n.startswith(prefix + "/")}
    have = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if set(have) != set(want):
        raise ArtifactError(f"{path}: {prefix} tensors differ from the manifest (missing "
                            f"{sorted(set(want) - set(have))[:5]}, unlisted {sorted(set(have) - set(want))[:5]})")
    for k, t in have.items():
        info = want[k]
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != info["shape"] or dtype != info["dtype"] or tensor_sha256(t) != info["sha256"]:
            raise ArtifactError(f"{path}: tensor '{prefix}/{k}' differs from the manifest "
                                f"({dtype}{list(t.shape)} vs {info['dtype']}{info['shape']}, or its sha256)")


def load_sharded_part(
    path: str | Path,
    *,
    rank: int,
    world_size: int,
    plan: Any = None,
    verify: bool = True,
    group: Any = None,
    timeout_s: float = 30.0,
) -> ShardedPart:
    """Load rank ``rank``'s part of the sharded artifact at ``path`` (see module doc).

    ``plan``: when given (``Plan`` / dict / path), it must be the plan the artifact was exported
    for. ``group``: the process group of this rank's replica (None = default group, one replica).
    Raises :class:`ArtifactError` naming the mismatch or the bad part.
    """
    path = Path(path)
    manifest = read_sharded_manifest(path)
    shards, replicas = manifest["shards"], manifest["replicas"]
    try:
        groups, _ = world_layout(world_size, shards, replicas)
    except ValueError as err:
        raise ArtifactError(f"{path}: {err}") from None
    if not 0 <= rank < world_size:
        raise ArtifactError(f"rank {rank} is outside the world of {world_size} ranks")
    if plan is not None:
        try:
            pdict = _plan_dict(plan)
        except ValueError as err:
            raise ArtifactError(f"plan: {err}") from None
        got = plan_sha256(pdict)  # type: ignore[arg-type]
        if got != manifest.get("plan_sha256"):
            stored = manifest.get("plan_sha256")
            raise ArtifactError(
                f"{path}: plan mismatch: the artifact was exported for "
                + (f"plan {stored[:12]} ({shards} shards)" if stored else f"no plan ({shards} shards)")
                + f", the given plan is {got[:12]} ({pdict['shards']} shards)")  # type: ignore[index]
    shard = rank % shards
    part = part_name(shard)
    if verify:
        for name in (COMMON, part, VOCAB, ITEMS) + ((PLAN,) if PLAN in manifest["files"] else ()):
            _verify_file(path, name, manifest)
    common, pstate = _load(path, COMMON), _load(path, part)
    if verify:
        _verify_tensors(path, "common/model", common["model"], manifest)
        _verify_tensors(path, "common/item_tower", common.get("item_tower", {}), manifest)
        _verify_tensors(path, f"{part[:-3]}/model", pstate["model"], manifest)
        if _pairing(manifest["tensors"]) != manifest["pairing_id"]:
            raise ArtifactError(f"{path}: pairing mismatch: the user tower and the index parts do not "
                                "belong together (manifest tampered with); re-export")
    try:
        model, item_tower = _build(manifest, common, pstate["model"], shard, group, timeout_s)
    except ArtifactError:
        raise
    except Exception as err:  # noqa: BLE001 - a state that does not rebuild is unusable
        raise ArtifactError(f"{path}: part {shard} does not rebuild from the manifest config "
                            f"({type(err).__name__}: {err})") from None
    try:
        vocab = json.loads((path / VOCAB).read_text())
        items = json.loads((path / ITEMS).read_text())
        uv, iv = dict(vocab["user"]), dict(vocab["item"])
        raw, titles = list(items["raw_ids"]), list(items["titles"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: vocab.json / items.json unreadable ({err})") from None
    return ShardedPart(model, item_tower, manifest, uv, iv, raw, titles, shard, rank // shards, path)


def _build(manifest: dict[str, Any], common: dict[str, Any], part: dict[str, Any], shard: int,
           group: Any, timeout_s: float) -> tuple[ShardedRetrievalModel, ItemTower]:
    cfg = manifest["config"]
    rcfg = from_dict(RetrievalConfig, cfg["retrieval"])
    mstate = {**common["model"], **part}
    index = ItemIndex.from_state_dict({k[6:]: v for k, v in part.items() if k.startswith("index.")})
    dim = index.ivf.dim
    cards = {k: int(v) for k, v in cfg["item_cardinalities"].items()}
    user_tower = UserTower(from_dict(TowerConfig, cfg["user_tower"]), cfg["user_cardinalities"])
    overarch = OverArch(rcfg.overarch, dim, cards)
    reranker = Reranker(rcfg.reranker, dim, overarch.num_tasks) if cfg.get("reranker") else None
    tables = {n: mstate[f"item_feature_{n}"] for n in overarch.feature_names}
    model = ShardedRetrievalModel(
        user_tower, index, overarch, ValueModel(rcfg.value_model), reranker, tables, rcfg,
        mstate["global_offsets"], num_items=int(part["item_slot"].shape[0]), rank=shard,
        world_size=manifest["shards"], group=group, timeout_s=timeout_s,
    )
    model.load_state_dict(mstate, strict=True)
    item_tower = ItemTower(from_dict(TowerConfig, cfg["item_tower"]), cfg["item_tower_cardinalities"])
    item_tower.load_state_dict(common["item_tower"], strict=True)
    return model.eval(), item_tower.eval()
