"""The serving artifact: one versioned directory, written atomically, verified and loaded.

Layout of an artifact directory (format ``silvertorch-artifact``, :data:`FORMAT_VERSION`)::

    manifest.json         format, version id, config, index dtype, pairing id, code version, the
                          sha256 / shape / dtype of every tensor and the sha256 / size of every file
    tensors.pt            torch.save({"model": RetrievalModel.state_dict(),
                                      "item_tower": ItemTower.state_dict()})
    vocab.json            {"user": {feature: [value, ...]}, "item": {feature: [value, ...]}}
    items.json            {"raw_ids": [...], "titles": [...]}  (internal item id -> raw id / title)
    user_tower.pt2        torch.export ExportedProgram of the user tower (optional, see docs/export.md)
    retrieval_head.pt2    torch.export ExportedProgram of RetrievalHead (no filter, dynamic batch)

The directory is written into a temporary sibling, every file fsynced, then renamed into place: a
reader never sees a half-written artifact. :func:`load_artifact` checks the format version, every
file hash, every tensor hash and the **pairing id** (a hash over the user tower weights and the
index vectors / scales / layout): the user tower and the item vectors it was trained with can only
be deployed together. Any failure raises :class:`ArtifactError` naming the part that is wrong.

The loader rebuilds the module skeletons from the manifest's config and ``load_state_dict``\\ s the
saved tensors (strict), so catalog-sized buffers take whatever shapes the artifact holds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

import silvertorch
from silvertorch.config import from_dict, to_dict
from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.search import ItemIndex
from silvertorch.model import RetrievalConfig, RetrievalHead, RetrievalModel
from silvertorch.modules.overarch import OverArch
from silvertorch.modules.reranker import Reranker
from silvertorch.modules.towers import ItemTower, Tower, TowerConfig, UserTower
from silvertorch.modules.value_model import ValueModel

__all__ = [
    "ArtifactError",
    "FORMAT",
    "FORMAT_VERSION",
    "ServingArtifact",
    "write_artifact",
    "load_artifact",
    "verify_artifact",
    "read_manifest",
    "pairing_id",
    "tensor_sha256",
    "encode_user_features",
    "encode_item_features",
    "UserTowerProgram",
    "load_programs",
    "check_programs",
]

FORMAT = "silvertorch-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TENSORS = "tensors.pt"
VOCAB = "vocab.json"
ITEMS = "items.json"
PROGRAMS = {"user_tower": "user_tower.pt2", "retrieval_head": "retrieval_head.pt2"}
HEAD_K = 100  # k of the exported RetrievalHead (capped by retrieval.max_k)
EXPORT_MAX_BATCH = 4096
# model state entries that, with the user tower's, make up the pairing id
PAIRED_INDEX_TENSORS = ("index.ivf.vectors", "index.ivf.scales", "index.ivf.slot_ids",
                        "index.ivf.centroids", "index.ivf.cluster_offsets")  # fmt: skip
_CHUNK = 1 << 24


class ArtifactError(Exception):
    """An artifact that cannot be served: corrupt or truncated file, hash mismatch, missing part,
    user tower / index pairing mismatch, or an incompatible format version."""


@dataclass
class ServingArtifact:
    """A loaded artifact. ``model`` and ``item_tower`` are in eval mode on the CPU.

    ``user_vocab`` / ``item_vocab``: per feature, value id -> raw value string (id 0 = OOV);
    ``item_raw_ids[i]`` / ``item_titles[i]``: raw id / title of internal item id ``i``.
    """

    model: RetrievalModel
    item_tower: ItemTower
    manifest: dict[str, Any]
    user_vocab: dict[str, list[str]]
    item_vocab: dict[str, list[str]]
    item_raw_ids: list[str]
    item_titles: list[str]
    path: Path
    _encoders: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict, repr=False)

    @property
    def version(self) -> str:
        """The manifest's unique ``version_id``."""
        return str(self.manifest["version_id"])

    @property
    def pairing(self) -> str:
        """The pairing id of the user tower and the index."""
        return str(self.manifest["pairing_id"])


# ------------------------------------------------------------------------------------ hashing
def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's bytes (C-contiguous, native byte order); shape / dtype are not mixed
    in (the manifest records them separately)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pairing_id(tensor_hashes: Mapping[str, str]) -> str:
    """Hash over the user tower's tensors and the index vectors / scales / layout.

    ``tensor_hashes``: name -> sha256 for the ``model/...`` entries of an artifact (as in the
    manifest). Raises :class:`ArtifactError` when a paired tensor is absent.
    """
    names = sorted(n for n in tensor_hashes if n.startswith("model/user_tower."))
    if not names:
        raise ArtifactError("no user tower tensors ('model/user_tower.*') to pair with the index")
    missing = [n for n in PAIRED_INDEX_TENSORS if f"model/{n}" not in tensor_hashes]
    if missing:
        raise ArtifactError(f"index tensors {missing} are missing: cannot pair the user tower with them")
    names += [f"model/{n}" for n in PAIRED_INDEX_TENSORS]
    text = "\n".join(f"{n}={tensor_hashes[n]}" for n in names)
    return hashlib.sha256(text.encode()).hexdigest()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# ------------------------------------------------------------------------------------ config
def _feature_rows(tower: Tower) -> dict[str, int]:
    """Feature -> rows of its table: rebuilding with these gives the same table sizes."""
    return {f: int(c.num_embeddings) for c in tower.ebc.embedding_bag_configs() for f in c.feature_names}


def model_config(model: RetrievalModel, item_tower: ItemTower) -> dict[str, Any]:
    """What the loader needs to rebuild the module skeletons (plain JSON values)."""
    return {
        "retrieval": to_dict(model.config),
        "user_tower": to_dict(model.user_tower.config),
        "user_cardinalities": _feature_rows(model.user_tower),
        "item_tower": to_dict(item_tower.config),
        "item_tower_cardinalities": _feature_rows(item_tower),
        "item_cardinalities": dict(model.overarch.cardinalities),
        "reranker": model.reranker is not None,
    }


def _flat_state(model: RetrievalModel, item_tower: ItemTower) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(name -> tensor, name -> JSON extra state) with ``model/`` / ``item_tower/`` prefixes."""
    tensors: dict[str, Tensor] = {}
    extras: dict[str, Any] = {}
    for prefix, module in (("model", model), ("item_tower", item_tower)):
        for k, v in module.state_dict().items():
            name = f"{prefix}/{k}"
            if isinstance(v, Tensor):
                tensors[name] = v.detach().cpu().contiguous()
            else:
                try:
                    json.dumps(v)
                except TypeError:
                    raise ValueError(f"state entry '{name}' is neither a tensor nor JSON data") from None
                extras[name] = v
    return tensors, extras


def _check_vocab(kind: str, vocab: Mapping[str, Sequence[str]], rows: Mapping[str, int],
                 error: type[Exception] = ValueError) -> dict[str, list[str]]:
    """Every feature of ``rows`` (feature -> table rows / cardinality) has a vocabulary that fits
    its table (so an encoded id never exceeds it)."""
    missing = [f for f in rows if f not in vocab]
    if missing:
        raise error(f"{kind} vocabulary lacks feature(s) {missing} (has {sorted(vocab)})")
    big = {f: (len(vocab[f]), n) for f, n in rows.items() if len(vocab[f]) > n}
    if big:
        raise error(f"{kind} vocabularies larger than their tables (values, rows): {big}")
    return {str(k): [str(x) for x in v] for k, v in vocab.items()}


# ------------------------------------------------------------------------------------ writing
def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)




def write_catalog_files(tmp: Path, uvocab: Mapping[str, list[str]], ivocab: Mapping[str, list[str]],
                        item_raw_ids: Sequence[str], item_titles: Sequence[str]) -> None:
    """The vocabularies (``vocab.json``) and the item ids / titles (``items.json``) into ``tmp``."""
    _write_file(tmp / VOCAB, json.dumps({"user": uvocab, "item": ivocab}).encode())
    _write_file(tmp / ITEMS, json.dumps({"raw_ids": [str(x) for x in item_raw_ids],
                                         "titles": [str(x) for x in item_titles]}).encode())


def manifest_head(fmt: str, version: int, tmp: Path, cfg: dict[str, Any],
                  model: RetrievalModel) -> dict[str, Any]:
    """The manifest fields every artifact kind shares, computed once the data files are in ``tmp``:
    format and its version, version id (UTC time + content hash), creation time, code version, config, index
    summary and ``files`` (sha256 and size of every file written so far)."""
    files = {p.name: {"sha256": _file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    content = hashlib.sha256(json.dumps({"files": files, "config": cfg}, sort_keys=True).encode()).hexdigest()
    now = _dt.datetime.now(_dt.timezone.utc)
    ivf = model.index.ivf
    return {
        "format": fmt,
        "format_version": version,
        "version_id": f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{content[:12]}",
        "created_utc": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "code": {"silvertorch": silvertorch.__version__, "torch": torch.__version__,
                 "git_commit": _git_commit()},
        "config": cfg,
        "index": {"dtype": str(ivf.vectors.dtype).removeprefix("torch."), "metric": ivf.metric,
                  "nlist": int(ivf.nlist), "dim": int(ivf.dim), "slots": int(ivf.num_slots),
                  "num_items": int(model.num_items), "eligibility": model.index.eligibility is not None},
        "files": files,
    }

def publish_directory(tmp: Path, out: Path) -> None:
    """Put the finished directory ``tmp`` (a sibling of ``out``) at ``out`` atomically: fsync it,
    rename it into place (an existing ``out`` is moved aside first, then removed), fsync the parent.
    A crash leaves either the old artifact or the new one at ``out``, never a mix."""
    _fsync_dir(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "a")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)

def write_artifact(
    out: str | Path,
    model: RetrievalModel,
    item_tower: ItemTower,
    *,
    config: dict[str, Any],
    user_vocab: Mapping[str, Sequence[str]],
    item_vocab: Mapping[str, Sequence[str]],
    item_raw_ids: Sequence[str],
    item_titles: Sequence[str] = (),
    extra_meta: dict[str, Any] | None = None,
    export_programs: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``model`` + ``item_tower`` as one artifact directory at ``out``; returns ``out``.

    ``config``: the run's config (plain values, kept in the manifest under ``config.run``); the
    module skeleton config (``retrieval``, towers, cardinalities) is derived from the modules.
    ``user_vocab`` must cover every user tower feature, ``item_vocab`` every item tower and OverArch
    feature. ``item_raw_ids[i]`` is the raw id of internal item id ``i``: at most
    ``model.num_items`` entries (a model grown by streaming updates keeps unassigned id headroom
    past the last raw id); ``item_titles`` as many or none. ``export_programs``: also write the
    torch.export programs (docs/export.md). ``overwrite``: replace an existing artifact at ``out``
    (else ``FileExistsError``). ``progress``: a tqdm bar over the writing stages.

    Raises ``ValueError`` on inconsistent inputs (nothing is written then).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --force) to replace it")
    if len(item_raw_ids) > model.num_items:
        raise ValueError(f"item_raw_ids has {len(item_raw_ids)} entries, the model's id space only "
                         f"{model.num_items} items")
    live = model.index.ivf.slot_ids
    top = int(live.max()) if live.numel() else -1
    if len(item_raw_ids) <= top:
        raise ValueError(f"item_raw_ids has {len(item_raw_ids)} entries but the index holds item id {top}")
    if item_titles and len(item_titles) != len(item_raw_ids):
        raise ValueError(f"item_titles has {len(item_titles)} entries, expected 0 or {len(item_raw_ids)}")
    uvocab = _check_vocab("user", user_vocab, _feature_rows(model.user_tower))
    ivocab = _check_vocab("item", item_vocab, {**_feature_rows(item_tower), **model.overarch.cardinalities})
    if item_tower.output_dim != model.index.ivf.dim:
        raise ValueError(f"item tower output {item_tower.output_dim} != index dimension {model.index.ivf.dim}")
    try:
        json.dumps({"config": config, "meta": extra_meta})
    except (TypeError, ValueError) as err:
        raise ValueError(f"config / extra_meta must be plain JSON values: {err}") from None
    modes = (model.training, item_tower.training)
    model.eval()
    item_tower.eval()
    try:
        return _write(out, model, item_tower, config, uvocab, ivocab, item_raw_ids, item_titles,
                      extra_meta, export_programs, progress)
    finally:  # the caller's modules keep their mode
        model.train(modes[0])
        item_tower.train(modes[1])


def _write(out: Path, model: RetrievalModel, item_tower: ItemTower, config: dict[str, Any],
           uvocab: dict[str, list[str]], ivocab: dict[str, list[str]], item_raw_ids: Sequence[str],
           item_titles: Sequence[str], extra_meta: dict[str, Any] | None, export_programs: bool,
           progress: bool) -> Path:
    """:func:`write_artifact` after its checks, modules in eval mode: temp dir -> fsync -> rename."""
    from tqdm.auto import tqdm

    bar = tqdm(total=4 if export_programs else 3, desc=f"write {out.name}", unit="step", leave=False,
               disable=not progress)
    tensors, extras = _flat_state(model, item_tower)
    hashes = {n: tensor_sha256(t) for n, t in tensors.items()}
    bar.update(1)
    pairing = pairing_id(hashes)
    cfg = model_config(model, item_tower)
    cfg["run"] = config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        state = {"model": {k[6:]: v for k, v in tensors.items() if k.startswith("model/")},
                 "item_tower": {k[11:]: v for k, v in tensors.items() if k.startswith("item_tower/")}}
        for name, value in extras.items():
            part, key = name.split("/", 1)
            state[part][key] = value
        with open(tmp / TENSORS, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        write_catalog_files(tmp, uvocab, ivocab, item_raw_ids, item_titles)
        bar.update(1)
        programs: dict[str, Any] = {}
        if export_programs:
            programs = _export_programs(model, tmp)
            bar.update(1)
        manifest = {
            **manifest_head(FORMAT, FORMAT_VERSION, tmp, cfg, model),
            "pairing_id": pairing,
            "tensors": {n: {"sha256": hashes[n], "shape": list(t.shape),
                            "dtype": str(t.dtype).removeprefix("torch.")} for n, t in tensors.items()},
            "state_extras": extras,
            "programs": programs,
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
    return out


# ------------------------------------------------------------------------------------ reading
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the artifact at ``path`` after checking its format and format version."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no artifact directory there")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: missing {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{mpath}: corrupt manifest (not JSON: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a '{FORMAT}' manifest (format={manifest.get('format')!r})"
                            if isinstance(manifest, dict) else f"{mpath}: manifest is not an object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version {version!r} is incompatible with this code "
                            f"(expects {FORMAT_VERSION}); re-export the artifact")
    types = {"version_id": str, "config": dict, "pairing_id": str, "tensors": dict, "files": dict,
             "state_extras": dict}
    for key, typ in types.items():
        if not isinstance(manifest.get(key), typ):
            raise ArtifactError(f"{mpath}: manifest lacks '{key}' (a {typ.__name__})")
    for name, info in manifest["files"].items():
        if Path(name).name != name or name in (".", "..") or not isinstance(info, dict):
            raise ArtifactError(f"{mpath}: bad file entry {name!r} (plain file names with sha256 and bytes)")
    if not all(isinstance(i, dict) for i in manifest["tensors"].values()):
        raise ArtifactError(f"{mpath}: every tensor entry must be an object with sha256, shape, dtype")
    return manifest


def _verify_files(path: Path, manifest: dict[str, Any]) -> None:
    for need in (TENSORS, VOCAB, ITEMS):
        if need not in manifest["files"]:
            raise ArtifactError(f"{path}: manifest lists no '{need}'")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: missing file '{name}' listed in the manifest")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise ArtifactError(f"{f}: {size} bytes, the manifest says {info.get('bytes')} (truncated or modified)")
        if _file_sha256(f) != info.get("sha256"):
            raise ArtifactError(f"{f}: sha256 mismatch with the manifest (corrupt or modified)")


def _load_state(path: Path, mmap: bool) -> dict[str, dict[str, Any]]:
    """``tensors.pt``; ``mmap``: the tensors are copy-on-write views of the file's pages (see
    :func:`load_artifact`)."""
    try:
        state = torch.load(path / TENSORS, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ArtifactError(f"{path / TENSORS}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or set(state) != {"model", "item_tower"} or not all(
            isinstance(v, dict) for v in state.values()):
        raise ArtifactError(f"{path / TENSORS}: expected the keys 'model' and 'item_tower'")
    return state


def _verify_tensors(path: Path, manifest: dict[str, Any], state: dict[str, dict[str, Any]]) -> None:
    flat = {f"{part}/{k}": v for part, sd in state.items() for k, v in sd.items()}
    tensors = {n: v for n, v in flat.items() if isinstance(v, Tensor)}
    extras = {n: v for n, v in flat.items() if not isinstance(v, Tensor)}
    want = manifest["tensors"]
    if set(tensors) != set(want):
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        raise ArtifactError(f"{path}: tensors differ from the manifest (missing {missing[:5]}, "
                            f"unlisted {extra[:5]})")
    for name in sorted(want):
        t, info = tensors[name], want[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != info.get("shape") or dtype != info.get("dtype"):
            raise ArtifactError(f"{path}: tensor '{name}' is {dtype}{list(t.shape)}, the manifest "
                                f"says {info.get('dtype')}{info.get('shape')}")
        if tensor_sha256(t) != info.get("sha256"):
            raise ArtifactError(f"{path}: tensor '{name}' sha256 mismatch with the manifest")
    if json.loads(json.dumps(extras)) != manifest["state_extras"]:
        raise ArtifactError(f"{path}: non-tensor state differs from the manifest's state_extras")
    pairing = pairing_id({n: i["sha256"] for n, i in want.items()})
    if pairing != manifest["pairing_id"]:
        raise ArtifactError(f"{path}: pairing mismatch: the user tower and the index vectors do not "
                            f"belong together (recomputed {pairing[:12]}, manifest "
                            f"{str(manifest['pairing_id'])[:12]}); deploy them only as exported together")


def verify_artifact(path: str | Path) -> dict[str, Any]:
    """Check format, every file hash, every tensor hash and the pairing id; returns the manifest.

    Raises :class:`ArtifactError` naming the first bad part.
    """
    path = Path(path)
    manifest = read_manifest(path)
    _verify_files(path, manifest)
    _verify_tensors(path, manifest, _load_state(path, mmap=True))  # hashed from the page cache
    return manifest


def _empty_attributes(num_items: int, cards: Mapping[str, int]) -> ItemAttributes:
    """Attribute placeholders of the right sizes; the real tables come from the state dict."""
    offsets = torch.zeros(num_items + 1, dtype=torch.int64)
    empty = torch.zeros(0, dtype=torch.int64)
    return ItemAttributes(num_items, {n: Attribute(n, offsets, empty, int(c)) for n, c in cards.items()})


def _build_modules(cfg: dict[str, Any], state: dict[str, dict[str, Any]]) -> tuple[RetrievalModel, ItemTower]:
    """The modules of the manifest ``cfg`` holding the tensors of ``state`` themselves (assigned, not
    copied: a memory-mapped state stays mapped, a loaded one is not held twice)."""
    mstate = state["model"]
    rcfg = from_dict(RetrievalConfig, cfg["retrieval"])
    user_tower = UserTower(from_dict(TowerConfig, cfg["user_tower"]), cfg["user_cardinalities"])
    index = ItemIndex.from_state_dict({k[6:]: v for k, v in mstate.items() if k.startswith("index.")},
                                      assign=True)
    dim = index.ivf.dim
    cards = {k: int(v) for k, v in cfg["item_cardinalities"].items()}
    overarch = OverArch(rcfg.overarch, dim, cards)
    reranker = Reranker(rcfg.reranker, dim, overarch.num_tasks) if cfg.get("reranker") else None
    attrs = _empty_attributes(int(mstate["item_slot"].shape[0]), cards)
    model = RetrievalModel(user_tower, index, overarch, ValueModel(rcfg.value_model), reranker, attrs, rcfg)
    model.load_state_dict(mstate, strict=True, assign=True)
    item_tower = ItemTower(from_dict(TowerConfig, cfg["item_tower"]), cfg["item_tower_cardinalities"])
    item_tower.load_state_dict(state["item_tower"], strict=True, assign=True)
    return model.eval(), item_tower.eval()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable ({err})") from None


def load_artifact(path: str | Path, *, verify: bool = True, mmap: bool = True,
                  item_names: bool = True) -> ServingArtifact:
    """Load the artifact at ``path`` (modules rebuilt from the config, state loaded strictly).

    ``verify``: check every file hash, tensor hash and the pairing id first (the format version is
    always checked). ``mmap``: the modules' tensors are private (copy-on-write) memory maps of
    ``tensors.pt`` instead of copies on the heap: loading reads nothing up front, processes of one
    host that load the same artifact share its pages in the page cache, and an in-place update (a
    streaming upsert) copies only the pages it writes. (A replaced artifact is renamed into place,
    so the mapped file of a running server is never rewritten under it.) ``mmap=False`` reads
    every tensor into memory. ``item_names=False`` leaves ``items.json`` unread (``item_raw_ids``
    and ``item_titles`` empty; its hash is still verified): for a process that never names an item,
    as 10M raw ids are about 1 GB of Python strings. The exported programs are not loaded (see
    :func:`load_programs`).
    Raises :class:`ArtifactError` for anything that makes the artifact unusable.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        _verify_files(path, manifest)
    state = _load_state(path, mmap=mmap)
    if verify:
        _verify_tensors(path, manifest, state)
    try:
        model, item_tower = _build_modules(manifest["config"], state)
    except ArtifactError:
        raise
    except Exception as err:  # noqa: BLE001 - a config / state that does not rebuild is unusable
        raise ArtifactError(f"{path}: the saved modules do not rebuild from the manifest config "
                            f"({type(err).__name__}: {err})") from None
    vocab = _read_json(path / VOCAB)
    items = _read_json(path / ITEMS) if item_names else {"raw_ids": [], "titles": []}
    try:
        user_vocab, item_vocab = dict(vocab["user"]), dict(vocab["item"])
        raw_ids, titles = list(items["raw_ids"]), list(items["titles"])
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: vocab.json / items.json lack an entry ({err})") from None
    _check_vocab("user", user_vocab, _feature_rows(model.user_tower), ArtifactError)
    _check_vocab("item", item_vocab, {**_feature_rows(item_tower), **model.overarch.cardinalities}, ArtifactError)
    if len(raw_ids) > model.num_items or (titles and len(titles) != len(raw_ids)):
        raise ArtifactError(f"{path}: items.json has {len(raw_ids)} raw ids and {len(titles)} titles "
                            f"for an id space of {model.num_items} items")
    return ServingArtifact(model, item_tower, manifest, user_vocab, item_vocab, raw_ids, titles, path)


# ------------------------------------------------------------------------------------ encoding
def _encoder(source: ServingArtifact | Mapping[str, Sequence[str]], kind: str,
             keys: Sequence[str] | None) -> tuple[list[str], dict[str, dict[str, int]], set[str]]:
    """(tower keys in order, per-key value -> id, names accepted in a request)."""
    if isinstance(source, ServingArtifact):
        vocab = source.user_vocab if kind == "user" else source.item_vocab
        tower = source.model.user_tower if kind == "user" else source.item_tower
        keys = list(tower.feature_names)
        cache = source._encoders
        if kind not in cache:
            cache[kind] = {k: {v: i for i, v in enumerate(vals)} for k, vals in vocab.items()}
        return keys, cache[kind], set(vocab)
    keys = list(keys) if keys is not None else list(source)
    missing = [k for k in keys if k not in source]
    if missing:
        raise ValueError(f"no {kind} vocabulary for feature(s) {missing} (known: {sorted(source)})")
    return keys, {k: {v: i for i, v in enumerate(vals)} for k, vals in source.items()}, set(source)


def _encode(source: Any, kind: str, rows: Sequence[Mapping[str, Any]],
            keys: Sequence[str] | None) -> KeyedJaggedTensor:
    keys, index, known = _encoder(source, kind, keys)
    unknown = sorted({f for r in rows for f in r} - known)
    if unknown:
        raise ValueError(f"unknown {kind} feature(s) {unknown}; the model knows {sorted(known)}")
    lengths: list[int] = []
    values: list[int] = []
    for key in keys:
        table = index[key]
        for row in rows:
            raw = row.get(key, ())
            vals = [raw] if isinstance(raw, (str, int)) else list(raw)
            lengths.append(len(vals))
            values.extend(table.get(str(v), 0) for v in vals)
    return KeyedJaggedTensor(keys, torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int64), stride=len(rows))


def encode_user_features(artifact_or_vocab: ServingArtifact | Mapping[str, Sequence[str]],
                         users: Sequence[Mapping[str, str | Sequence[str]]],
                         keys: Sequence[str] | None = None) -> KeyedJaggedTensor:
    """Raw user feature values -> the user tower's KJT (batch ``len(users)``, ``int64`` ids).

    Each user is ``{feature: value or list of values}``; a value (or user) never seen in training
    maps to the OOV id 0, a missing feature is an empty bag, a feature name the model does not know
    raises ``ValueError`` naming it. With a vocabulary mapping instead of an artifact, ``keys``
    (default: the mapping's keys) are the tower features in order.
    """
    return _encode(artifact_or_vocab, "user", users, keys)


def encode_item_features(artifact_or_vocab: ServingArtifact | Mapping[str, Sequence[str]],
                         items: Sequence[Mapping[str, str | Sequence[str]]],
                         keys: Sequence[str] | None = None) -> KeyedJaggedTensor:
    """Raw item feature values -> the item tower's KJT (as :func:`encode_user_features`);
    attribute-only features (known to ``item_vocab`` but not read by the tower) are accepted and
    left out of the KJT."""
    return _encode(artifact_or_vocab, "item", items, keys)




# ------------------------------------------------------------------------------------ programs
class UserTowerProgram(nn.Module):
    """The user tower with plain tensor inputs (what is exported with a dynamic batch).

    ``values (nnz,) int64`` and ``lengths (F * B,) int64`` are a KJT's, feature-major in the order
    of ``tower.feature_names`` -> ``(B, D) f32``.
    """

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower
        self.keys = list(tower.feature_names)

    def forward(self, values: Tensor, lengths: Tensor) -> Tensor:
        return self.tower(KeyedJaggedTensor(self.keys, values, lengths=lengths))


def sample_user_kjt(tower: Tower, batch: int, seed: int = 0) -> KeyedJaggedTensor:
    """A request batch of valid random ids (1-2 values per feature per row) for ``tower``."""
    g = torch.Generator().manual_seed(seed)
    rows = _feature_rows(tower)
    keys = list(tower.feature_names)
    lengths = torch.randint(1, 3, (len(keys) * batch,), generator=g)
    values = torch.cat([torch.randint(0, rows[k], (int(n),), generator=g)
                        for i, k in enumerate(keys) for n in lengths[i * batch:(i + 1) * batch]])
    return KeyedJaggedTensor(keys, values, lengths=lengths, stride=batch)


def _without_user_tower(model: RetrievalModel) -> RetrievalModel:
    """A shallow view of ``model`` (same tensors) without the user tower: the head never calls
    it, and torch.export would otherwise save its weights in the head's program too."""
    view = object.__new__(type(model))
    view.__dict__ = dict(model.__dict__)
    view._modules = {**model._modules, "user_tower": nn.Identity()}
    return view


def _export_user_tower_at(tower: Tower, min_batch: int) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`UserTowerProgram` with a dynamic batch ``min_batch..4096`` and a
    dynamic ``nnz`` ``0..4096*64`` (a request whose features are all empty bags has ``nnz = 0``).

    ``min_batch = 1`` traces with size-oblivious reasoning on backed sizes
    (``torch.fx.experimental._config.backed_size_oblivious``, "an experimental option for
    export" in torch 2.13): without it the tracer assumes every dynamic size is >= 2 and guards
    ``B != 1`` (the contiguity checks of TorchRec's KJT splits and of the ``(B, D)`` output add
    ``Ne(B, 1)``), so the program refuses a batch of 1.
    """
    import torch.fx.experimental._config as fx_config

    kjt = sample_user_kjt(tower, 3)
    ubatch = torch.export.Dim("ubatch", min=min_batch, max=EXPORT_MAX_BATCH)
    nnz = torch.export.Dim("nnz", min=0, max=EXPORT_MAX_BATCH * 64)
    n_feat = len(tower.feature_names)
    patch = fx_config.patch(backed_size_oblivious=True) if min_batch == 1 else contextlib.nullcontext()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # TorchRec logs a "KJT to_dict is slow" warning per export
    try:
        with patch:
            return torch.export.export(
                UserTowerProgram(tower), (kjt.values(), kjt.lengths()),
                dynamic_shapes={"values": {0: nnz}, "lengths": {0: n_feat * ubatch}}, strict=False)
    finally:
        root.setLevel(level)


def _export_user_tower(tower: Tower) -> tuple[torch.export.ExportedProgram, int]:
    """(program, min_batch): the user tower exported for batches ``1..4096``, checked against the
    eager tower at batch 1 and 2 (outputs identical, a row of empty bags included); if that export
    fails or differs, the batch ``2..4096`` program of earlier versions (``min_batch = 2``)."""
    try:
        ep = _export_user_tower_at(tower, 1)
        program = ep.module()
        for batch, seed in ((1, 11), (2, 12)):
            kjt = sample_user_kjt(tower, batch, seed)
            if not torch.equal(program(kjt.values(), kjt.lengths()), tower(kjt)):
                raise ValueError(f"the batch-1 program differs from the eager tower at batch {batch}")
        empty = torch.zeros(len(tower.feature_names), dtype=torch.int64)  # one user, no features
        if not torch.equal(program(empty[:0], empty), tower(KeyedJaggedTensor(
                list(tower.feature_names), empty[:0], lengths=empty, stride=1))):
            raise ValueError("the batch-1 program differs from the eager tower on empty bags")
        return ep, 1
    except Exception as err:  # noqa: BLE001 - fall back to the program without batch 1
        warnings.warn(f"user tower: no batch-1 program ({type(err).__name__}: {err}); exporting "
                      "batch 2..4096 (pad a single request to two rows)", stacklevel=2)  # fmt: skip
        return _export_user_tower_at(tower, 2), 2


@torch.no_grad()
def _export_programs(model: RetrievalModel, directory: Path) -> dict[str, Any]:
    """Export the user tower and the RetrievalHead into ``directory``; returns their manifest entry.

    A program that fails to export is recorded with its error instead (the eager modules are what
    the server runs; docs/export.md).
    """
    out: dict[str, Any] = {}
    kjt = sample_user_kjt(model.user_tower, 3)
    batch = torch.export.Dim("batch", min=1, max=EXPORT_MAX_BATCH)
    try:
        ep, min_batch = _export_user_tower(model.user_tower)
        torch.export.save(ep, directory / PROGRAMS["user_tower"])
        out["user_tower"] = {"file": PROGRAMS["user_tower"], "inputs": ["values", "lengths"],
                             "keys": list(model.user_tower.feature_names), "batch": "dynamic",
                             "min_batch": min_batch, "max_batch": EXPORT_MAX_BATCH}
    except Exception as err:  # noqa: BLE001 - recorded in the manifest, the artifact stays usable
        out["user_tower"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    k = min(HEAD_K, model.config.max_k)
    try:
        query = model.user_tower(kjt)
        ep = torch.export.export(RetrievalHead(_without_user_tower(model), k), (query,),
                                 dynamic_shapes={"query": {0: batch}})
        torch.export.save(ep, directory / PROGRAMS["retrieval_head"])
        out["retrieval_head"] = {"file": PROGRAMS["retrieval_head"], "inputs": ["query"], "k": k,
                                 "nprobe": model.config.nprobe, "filter": None, "batch": "dynamic",
                                 "min_batch": 1, "max_batch": EXPORT_MAX_BATCH}
    except Exception as err:  # noqa: BLE001
        out["retrieval_head"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return out


def load_programs(artifact: ServingArtifact | str | Path) -> dict[str, torch.export.ExportedProgram]:
    """The artifact's exported programs (name -> ExportedProgram), loaded on demand.

    Programs that failed to export (manifest entry with ``error``) are left out. The files are
    hash-checked by :func:`load_artifact` / :func:`verify_artifact`.
    """
    import silvertorch.retrieval_ops  # noqa: F401 - registers the search op and output pytree

    path = artifact.path if isinstance(artifact, ServingArtifact) else Path(artifact)
    manifest = artifact.manifest if isinstance(artifact, ServingArtifact) else read_manifest(path)
    programs = {}
    for name, info in manifest.get("programs", {}).items():
        if "file" not in info:
            continue
        try:
            programs[name] = torch.export.load(path / info["file"])
        except Exception as err:  # noqa: BLE001
            raise ArtifactError(f"{path / info['file']}: exported program '{name}' does not load "
                                f"({type(err).__name__}: {err})") from None
    return programs


@torch.no_grad()
def check_programs(artifact: ServingArtifact, batch: int = 5, seed: int = 1) -> dict[str, bool]:
    """Run each exported program and the eager module on a sample batch of ``batch`` requests
    (another size than the export's); name -> outputs identical. A program whose ``min_batch``
    exceeds ``batch`` is left out."""
    programs = load_programs(artifact)
    model = artifact.model
    kjt = sample_user_kjt(model.user_tower, batch, seed)
    query = model.user_tower(kjt)
    result = {}
    info = artifact.manifest.get("programs", {})
    if "user_tower" in programs and batch >= int(info["user_tower"].get("min_batch", 1)):
        got = programs["user_tower"].module()(kjt.values(), kjt.lengths())
        result["user_tower"] = bool(torch.equal(got, query))
    if "retrieval_head" in programs:
        k = int(artifact.manifest["programs"]["retrieval_head"]["k"])
        got = programs["retrieval_head"].module()(query)
        want = model.retrieve_from_query(query, k)
        result["retrieval_head"] = all(bool(torch.equal(a, b)) for a, b in zip(got, want))
    return result
