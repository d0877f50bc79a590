"""Compaction and hot swap of one rank's shard, and the per-rank durable state they share.

Every function here runs on the rank's single owner (the leader's owner thread, or a follower's
message loop), between batches, and every collective in it is called by all ranks of the replica in
the same order (the leader broadcasts the command first), so the ranks stay in step.

**Per-rank state** (``STATE/<artifact version>/``, ``STATE`` = ``--state-dir`` or its
``replica-g`` sub-directory): the leader's update log ``log.jsonl``; one snapshot per shard
``snapshot-shard-SSSSS-<seq>.pt`` (``serve/snapshot.py`` format: the shard's catalog state after
every log record up to ``seq``; the leader's also holds the raw-id map); and the leader's commit
file ``snapshot.json`` ``{"seq": n}``: the snapshot set in force. A snapshot set is committed only
after every rank wrote its file (a vote over the process group), and the log is truncated only
after the commit, so a crash at any point restarts from one consistent set: the committed
snapshots plus the log records after ``seq``.

**Compaction** (:func:`compact_shard`): ``silvertorch.catalog.compact_state`` on the rank's catalog
state (fresh items fold into their nearest cluster *on the fresh owner's shard*, tombstones are
dropped; items stay on their rank). A cluster may then be held by two ranks (its owner's main
items and the fresh owner's folded ones): the rank's ``global_offsets`` are re-derived from the
per-cluster live counts of all ranks (one all-gather) so that the merge's tie-break by global slot
orders the items as the unsharded compaction lays them out (owner's items first, then the others).

**Hot swap** (:func:`load_staged`): each rank loads its part of the new artifact and its committed
snapshot; the ranks vote (:func:`vote`) and switch only when all of them succeeded.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from serve.snapshot import read_snapshot, write_snapshot
from serve.update_log import LogError, fsync_dir
from silvertorch.catalog import compact_state
from silvertorch.distributed.sharded_retrieval import ShardedRetrievalModel
from silvertorch.export_sharded import ShardedPart
from silvertorch.index.layout import SLOT_ALIGN
from silvertorch.index.search import ItemIndex

__all__ = ["RankState", "catalog_state", "install_state", "snapshot_path", "read_commit", "write_commit",
           "compact_shard", "global_offsets_for", "vote", "load_snapshot", "prune_snapshots"]

COMMIT = "snapshot.json"
_VOTE_BYTES = 400


@dataclass
class RankState:
    """What one rank serves: its part, its catalog (None = read-only / GPU rank), the seq of the
    snapshot its state starts from, and its state directory (None = no durable state)."""

    part: ShardedPart
    catalog: Any = None
    snapshot_seq: int = 0
    state_dir: Path | None = None
    ids_state: dict[str, Any] | None = field(default=None, repr=False)  # the leader's, from a snapshot


# ------------------------------------------------------------------------------- state files
def snapshot_path(state_dir: Path, shard: int, seq: int) -> Path:
    return Path(state_dir) / f"snapshot-shard-{shard:05d}-{int(seq)}.pt"


def read_commit(state_dir: Path | None) -> int | None:
    """The committed snapshot seq in ``state_dir`` (None = no snapshot: start from the artifact;
    0 is a real snapshot, a compaction before any update)."""
    if state_dir is None:
        return None
    f = Path(state_dir) / COMMIT
    if not f.exists():
        return None
    try:
        seq = json.loads(f.read_text())["seq"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LogError(f"{f}: unreadable snapshot commit file ({err})") from None
    if not isinstance(seq, int) or seq < 0:
        raise LogError(f"{f}: 'seq' must be an int >= 0, got {seq!r}")
    return seq


def write_commit(state_dir: Path, seq: int) -> None:
    """Atomically make the snapshot set ``seq`` the one in force (leader only)."""
    f = Path(state_dir) / COMMIT
    tmp = f.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps({"seq": int(seq)}))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, f)
    fsync_dir(f.parent)


def prune_snapshots(state_dir: Path | None, shard: int, keep: set[int]) -> None:
    """Remove this shard's snapshot files whose seq is not in ``keep`` (best effort)."""
    if state_dir is None or not Path(state_dir).exists():
        return
    pat = re.compile(rf"snapshot-shard-{shard:05d}-(\d+)\.pt$")
    for f in Path(state_dir).iterdir():
        m = pat.match(f.name)
        if m and int(m.group(1)) not in keep:
            try:
                f.unlink()
            except OSError:
                pass


# ------------------------------------------------------------------------------ model state
def catalog_state(model: ShardedRetrievalModel) -> dict[str, Tensor]:
    """The part of a shard's state that updates and compaction change (cloned, CPU): ``index.*``,
    ``item_slot``, ``global_offsets``, ``item_feature_*``, ``catalog_generation``."""
    keep = ("index.", "item_slot", "global_offsets", "item_feature_", "catalog_generation")
    return {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else copy.deepcopy(v))
            for k, v in model.state_dict().items() if k.startswith(keep)}


@torch.no_grad()
def install_state(model: ShardedRetrievalModel, state: dict[str, Tensor]) -> None:
    """Put a :func:`catalog_state`-like dict into ``model`` (sizes may differ from the current
    ones: the index is rebuilt from it). Raises ``KeyError`` naming a missing entry; ``model`` is
    changed only once everything was built."""
    for key in ("item_slot", "global_offsets", "catalog_generation"):
        if key not in state:
            raise KeyError(f"shard state lacks '{key}'")
    device = model.item_slot.device
    index = ItemIndex.from_state_dict({k[6:]: v for k, v in state.items() if k.startswith("index.")})
    tables = {}
    for name, buffer in model.feature_buffers.items():
        if buffer not in state:
            raise KeyError(f"shard state lacks '{buffer}'")
        tables[buffer] = state[buffer].to(device).clone()
    model.index = index.to(device)
    model.item_slot = state["item_slot"].to(device).clone()
    model.num_items = int(model.item_slot.shape[0])
    model.global_offsets = state["global_offsets"].to(torch.int64).clone()
    for buffer, t in tables.items():
        model._buffers[buffer] = t
    model.catalog_generation.fill_(int(state["catalog_generation"]))


def load_snapshot(rs: RankState, seq: int | None) -> None:
    """Load this rank's snapshot ``seq`` into ``rs.part.model`` (None = none: nothing to do).
    :class:`LogError` naming the file when it is missing or unusable."""
    if seq is None:
        return
    if rs.state_dir is None:
        raise LogError(f"snapshot {seq} is committed but this rank has no state directory")
    path = snapshot_path(rs.state_dir, rs.part.shard, seq)
    if not path.exists():
        raise LogError(f"{path}: snapshot {seq} of shard {rs.part.shard} is committed but missing on "
                       "this rank (every rank keeps its own snapshots under --state-dir)")
    snap = read_snapshot(path, rs.part.version)
    try:
        install_state(rs.part.model, snap["state_dict"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise LogError(f"{path}: does not fit this shard ({type(err).__name__}: {err})") from None
    rs.snapshot_seq = int(seq)
    rs.ids_state = snap.get("ids") or None


# ------------------------------------------------------------------------------- collectives
def vote(model: ShardedRetrievalModel, ok: bool, message: str = "") -> list[tuple[bool, str]]:
    """Every rank's ``(ok, message)`` (one all-gather; raises ``ShardPeerError`` when a peer is
    gone). All ranks see the same list, so they all decide the same."""
    data = message.encode()[:_VOTE_BYTES]
    t = torch.zeros(2 + _VOTE_BYTES, dtype=torch.int32)
    t[0], t[1] = int(ok), len(data)
    if data:
        t[2:2 + len(data)] = torch.tensor(list(data), dtype=torch.int32)
    everyone = model.all_gather(t).cpu()
    return [(bool(row[0]), bytes(row[2:2 + int(row[1])].tolist()).decode(errors="replace"))
            for row in everyone]


def refusals(votes: list[tuple[bool, str]]) -> str:
    """``"rank 1: ...; rank 2: ..."`` of the ranks that voted no."""
    return "; ".join(f"rank {r}: {msg or 'refused'}" for r, (ok, msg) in enumerate(votes) if not ok)


def _live_counts(index_state: dict[str, Tensor], C: int) -> Tensor:
    """``(C,) int64`` live items per main cluster of a compacted shard (no fresh region)."""
    off = index_state["index.ivf.cluster_offsets"].cpu()
    live = (index_state["index.ivf.slot_ids"].cpu() >= 0).to(torch.int64)
    csum = torch.zeros(live.numel() + 1, dtype=torch.int64)
    csum[1:] = torch.cumsum(live, 0)
    return csum[off[1:C + 1]] - csum[off[:C]]


def global_offsets_for(counts: Tensor, cluster_owner: Tensor, rank: int) -> Tensor:
    """This rank's ``(C+1,) int64`` global offsets after a compaction.

    ``counts (R, C) int64``: live items of every rank per cluster; ``cluster_owner (C,)``: the
    rank that owned each cluster at export. The global layout is the unsharded compaction's
    (64-aligned clusters); within cluster ``c`` the owner's items come first, then the other
    ranks' in rank order (the fresh owner's folded items: the unsharded compaction puts fresh items
    after a cluster's main items), so ``global_offsets[c]`` of rank ``r`` is the cluster start plus
    the items of the ranks before it in that order.
    """
    R, C = counts.shape
    total = counts.sum(0)
    spans = (total + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
    g = torch.zeros(C + 1, dtype=torch.int64)
    g[1:] = torch.cumsum(spans, 0)
    owner = cluster_owner.to(torch.int64)
    before = torch.zeros(C, dtype=torch.int64)
    mine_is_owner = owner == rank
    for s in range(R):
        if s == rank:
            continue
        # rank s precedes `rank` in cluster c when s owns c, or neither owns it and s < rank
        precedes = (owner == s) | (~mine_is_owner & (owner != s) & torch.tensor(s < rank))
        before += torch.where(precedes, counts[s], torch.zeros_like(counts[s]))
    out = g.clone()
    out[:C] += before
    return out


def compact_shard(rs: RankState, seq: int, ids: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Tensor] | None, str]:
    """Compact this rank's shard (collective: every rank of the replica calls it with the same
    ``seq``) and write its snapshot ``seq`` (``ids``: the leader's raw-id map,
    ``ItemIds.to_state()``; followers pass None). Returns ``(new state, "")`` or ``(None, reason)``
    when this rank failed; the caller then votes. Nothing is installed here."""
    model = rs.part.model
    C = int(model.index.ivf.nlist)
    new: dict[str, Tensor] | None = None
    reason = ""
    try:
        new = compact_state(catalog_state(model))
        counts = _live_counts(new, C)
    except Exception as err:  # noqa: BLE001 - voted on below: every rank keeps its state
        reason = f"compaction failed: {type(err).__name__}: {err}"
        counts = torch.zeros(C, dtype=torch.int64)
    flag = torch.tensor([1 if new is not None else 0], dtype=torch.int64)
    everyone = model.all_gather(torch.cat([flag, counts])).cpu()  # (R, 1 + C)
    if not bool(everyone[:, 0].all()):
        return None, reason or "another rank failed to compact"
    owner = torch.tensor(rs.part.manifest["assignment"]["cluster_owner"], dtype=torch.int64)
    new["global_offsets"] = global_offsets_for(everyone[:, 1:], owner, model.rank)  # type: ignore[index]
    if rs.state_dir is not None:
        try:
            write_snapshot(snapshot_path(rs.state_dir, rs.part.shard, seq), rs.part.version, seq,
                           new, ids or {})  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001
            return None, f"snapshot write failed: {type(err).__name__}: {err}"
    return new, ""


def build_catalog(part: ShardedPart) -> Any:
    """This rank's :class:`~serve.sharded.catalog.ShardCatalog` (a collective: every rank of the
    replica calls it). New items go to the shard with the fresh region; when the artifact has
    none yet, to the least-loaded shard, ties to the highest rank (shard 0 already carries the HTTP
    front, the log and the item tower)."""
    from .catalog import ShardCatalog

    a = part.manifest["assignment"]
    fresh_owner = int(a["fresh_owner"])
    if fresh_owner < 0:
        load = list(a["items_per_shard"])
        fresh_owner = min(range(len(load)), key=lambda r: (load[r], -r))
    return ShardCatalog.gather(part.model, fresh_owner)


def finish_compaction(rs: RankState, new: dict[str, Tensor] | None, votes: list[tuple[bool, str]],
                      seq: int) -> bool:
    """After the vote of a compaction: install the compacted state when every rank succeeded
    (True), else drop this rank's new snapshot and keep serving the old state (False)."""
    if new is None or not all(ok for ok, _ in votes):
        if seq != rs.snapshot_seq:
            prune_snapshots(rs.state_dir, rs.part.shard, {rs.snapshot_seq})
        return False
    from .catalog import ShardUpdater

    install_state(rs.part.model, new)
    if rs.catalog is not None:
        rs.catalog.updater = ShardUpdater(rs.part.model)
    # the previous set stays until the leader's commit of this one is certain (next compaction)
    prune_snapshots(rs.state_dir, rs.part.shard, {rs.snapshot_seq, seq})
    rs.snapshot_seq = int(seq)
    return True


def load_staged(rs: RankState, msg: dict[str, Any], *, rank: int, world_size: int, group: Any,
                timeout_s: float, state_root: Path | None) -> tuple[RankState | None, str]:
    """Phase one of a hot swap on this rank: load its part of the artifact ``msg["path"]``
    (verified: manifest, hashes, pairing, ``msg["plan"]``, world size) and its committed snapshot
    ``msg["seq"]``. Returns ``(staged state, "")`` or ``(None, why)``; nothing changes here."""
    from silvertorch.export import ArtifactError
    from silvertorch.export_sharded import load_sharded_part

    from serve.served import state_dir_for

    try:
        part = load_sharded_part(msg["path"], rank=rank, world_size=world_size, plan=msg.get("plan"),
                                 group=group, timeout_s=timeout_s)
        if part.manifest["shards"] != rs.part.manifest["shards"]:
            raise ArtifactError(f"shards: the new artifact has {part.manifest['shards']} shard(s) per "
                                f"replica, this job runs {rs.part.manifest['shards']}")
        part.model.to(rs.part.model.item_slot.device)
        sdir = state_dir_for(state_root, part.version) if state_root is not None else None
        staged = RankState(part, None, 0, sdir)
        load_snapshot(staged, msg.get("seq"))
    except (ArtifactError, LogError, ValueError, KeyError, OSError) as err:
        return None, f"{type(err).__name__}: {err}"
    return staged, ""
