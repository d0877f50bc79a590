"""Sharded serving: split / gather of an ItemIndex, the R-shard merge, and 2 real gloo ranks.

- in one process: ``R`` shards searched one by one and merged equal the unsharded model exactly
  (ids, composite scores, task scores, retrieval scores), with and without filters, value weights,
  the reranker, and after streaming updates (fresh segment, tombstones, patched attributes);
- one launch of 2 spawned gloo ranks: the real ``ShardedRetrievalModel.forward`` (all-gather) equals
  the unsharded model for the same requests; then the parent SIGKILLs rank 1 and rank 0's next
  request must raise ``ShardPeerError`` (not hang), and the one after it fail at once; a model on a
  group where the peer stays silent raises ``ShardPeerError`` once its timeout has passed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from silvertorch.catalog import CatalogUpdater
from silvertorch.distributed.sharded_index import (
    assign_clusters, gather_index, local_to_global_slots, shard_index, split_index,
)
from silvertorch.distributed.sharded_retrieval import (
    ShardedRetrievalModel, ShardPeerError, combine_owned, merge_candidates, pack_candidates,
    unpack_candidates,
)
from silvertorch.data.batching import features_to_kjt
from silvertorch.index import ItemIndex, SearchParams
from silvertorch.index.eligibility import EligibilityConfig
from silvertorch.index.expr import FilterSyntaxError
from silvertorch.model import RetrievalModel, TwoTower, TwoTowerConfig
from silvertorch.modules.reranker import RerankerConfig
from tests.test_retrieval_model import (
    DIM, GENRES, USER_CARD, make_items, retrieval_config, tower_cfg, user_kjt,
)

_IVF = ("centroids", "cluster_offsets", "slot_ids", "vectors", "scales", "live_words")
FILTERS = [None, ["genre:comedy"], ["NOT genre:drama AND decade:1990"], ["genre:horror OR genre:scifi"]]
USERS = list(range(12))
TIMEOUT_S = 20.0  # the sharded model's collective timeout in the 2-rank launch
HUNG_TIMEOUT_S = 2.0  # ... of the model whose peer never answers (that wait lasts this long)


def make_model(nlist: int = 8) -> RetrievalModel:
    """The tiny model of ``test_retrieval_model`` with the reranker on and ``genre`` in the Bloom
    signature (positive terms need verification, negated ones compile shard-specific exact rows)."""
    torch.manual_seed(0)
    items = make_items()
    item_card = {"item_id": items.num_items, "genre": len(GENRES)}
    two = TwoTower(TwoTowerConfig(user_tower=tower_cfg(USER_CARD), item_tower=tower_cfg(item_card)),
                   USER_CARD, item_card, num_items=items.num_items)
    with torch.no_grad():
        vectors = two.item_embeddings(
            features_to_kjt(items.features, torch.arange(items.num_items), ["item_id", "genre"]))
    index = ItemIndex.build(vectors, attributes=items, nlist=nlist,
                            eligibility_config=EligibilityConfig(modes={"genre": "bloom"}))
    cfg = retrieval_config(reranker=RerankerConfig(enabled=True, hidden_dim=16, top_n=20))
    return RetrievalModel.build(cfg, two.user_tower, index, items).eval()


def with_updates(model: RetrievalModel) -> RetrievalModel:
    """A copy after streaming updates: 5 new items (fresh segment, one beyond the id space),
    3 deletes (main and fresh), one in-place update and an attribute patch."""
    m = copy.deepcopy(model)
    up = CatalogUpdater(m)
    g = torch.Generator().manual_seed(7)
    n = m.num_items
    new = torch.tensor([n, n + 1, n + 2, n + 3, n + 9])
    up.upsert(new, torch.randn(5, DIM, generator=g) * 3,
              [{"genre": ["comedy"], "decade": ["1990"]}, {"genre": ["horror"]}, None,
               {"genre": ["drama", "scifi"]}, {"decade": ["1980"]}])
    up.delete(torch.tensor([3, 17, n + 1]))
    up.upsert(torch.tensor([5]), torch.randn(1, DIM, generator=g))
    up.patch_attributes(torch.tensor([8, n]), [{"genre": ["horror"]}, {"genre": ["scifi"]}])
    return m


def assert_same_output(got: Any, want: Any, what: str = "") -> None:
    for name, a, b in zip(("ids", "scores", "task_scores", "retrieval_scores"), got, want):
        assert torch.equal(a, b), f"{what}: {name} differ\n{a}\n{b}"


def simulated(models: list[ShardedRetrievalModel], kjt: Any, k: int, filters: Any = None,
              weights: torch.Tensor | None = None) -> Any:
    """What R ranks compute, in one process: each shard's scored candidates, the merge, the tail
    (the reranker's vectors fetched from their owners as the all-reduce would)."""
    q = models[0].user_tower(kjt)
    k_cand = max(k, models[0].config.k_prime)
    packed = torch.stack([m.local_candidates(q, k_cand, m.compile_filters(filters, q.shape[0]), None)
                          for m in models])
    merged = merge_candidates(*unpack_candidates(packed), k_cand)

    def fetch(ids: torch.Tensor) -> torch.Tensor:
        return combine_owned(torch.stack([m.owned_vectors(ids) for m in models]))

    return models[0].score_merged(q, *merged, k, weights, fetch=fetch)


@pytest.fixture(scope="module")
def base() -> RetrievalModel:
    return make_model()


@pytest.fixture(scope="module")
def updated(base: RetrievalModel) -> RetrievalModel:
    return with_updates(base)


# ----------------------------------------------------------------------------- split / gather
@pytest.mark.parametrize("which", ["base", "updated"])
def test_split_gather_round_trip(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    index = model.index
    q = torch.randn(6, DIM, generator=torch.Generator().manual_seed(1))
    for R in (1, 3):
        shards, a = split_index(index, R)
        assert sum(a.items_per_shard) == index.ivf.ntotal == sum(s.ivf.ntotal for s in shards)
        assert (a.fresh_owner >= 0) == index.ivf.has_fresh
        for r, s in enumerate(shards):
            assert torch.equal(s.ivf.centroids, index.ivf.centroids)  # every shard probes globally
            assert s.ivf.has_fresh == (r == a.fresh_owner)
            spans = s.ivf.spans()[: index.ivf.nlist]
            assert bool((spans[a.cluster_owner != r] == 0).all())
        back = gather_index(shards)
        for name in _IVF:
            assert torch.equal(getattr(back.ivf, name), getattr(index.ivf, name)), name
        if which == "base":  # a fresh build: the rebuilt eligibility is the same bytes
            sd, ref = back.eligibility.state_dict(), index.eligibility.state_dict()
            assert all(torch.equal(sd[k], ref[k]) for k in ref)
        for f in FILTERS:
            p = SearchParams(nprobe=3, filter=f)
            for got, want in zip(back.search(q, 30, p), index.search(q, 30, p)):
                assert torch.equal(got, want), (R, f)


def test_assignment_is_balanced_and_local_slots_map_back(updated: RetrievalModel) -> None:
    index = updated.index
    shards, a = split_index(index, 2)
    counts = [s.ivf.ntotal for s in shards]
    assert list(a.items_per_shard) == counts
    off, ids = index.ivf.cluster_offsets, index.ivf.slot_ids
    per_cluster = [int((ids[off[c] : off[c + 1]] >= 0).sum()) for c in range(off.numel() - 1)]
    assert abs(counts[0] - counts[1]) <= max(per_cluster)  # greedy on the least-loaded shard
    for s in shards:  # every live slot of a shard maps to the global slot holding the same item
        local = torch.nonzero(s.ivf.slot_ids >= 0).flatten()
        g = local_to_global_slots(s.ivf.cluster_offsets, a.global_offsets, local)
        assert torch.equal(index.ivf.slot_ids[g], s.ivf.slot_ids[local])
        assert torch.equal(index.ivf.vectors[g], s.ivf.vectors[local])
    assert local_to_global_slots(shards[0].ivf.cluster_offsets, a.global_offsets,
                                 torch.tensor([-1])).tolist() == [-1]


def test_split_rejects_bad_input(base: RetrievalModel, updated: RetrievalModel) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_shards"):
            split_index(base.index, bad)
    a = assign_clusters(base.index, 2)
    with pytest.raises(ValueError, match="rank must lie in"):
        shard_index(base.index, a, 2)
    with pytest.raises(ValueError, match="another slot layout"):
        shard_index(updated.index, a, 0)
    shards_a, _ = split_index(base.index, 2)
    other = make_model(nlist=4)
    with pytest.raises(ValueError, match="shard 1"):
        gather_index([shards_a[0], split_index(other.index, 2)[0][1]])
    with pytest.raises(ValueError, match="more than one shard"):
        gather_index([shards_a[0], shards_a[0]])


# ----------------------------------------------------------------------------- merge, simulated
def test_pack_unpack_is_bit_exact_and_merge_breaks_ties_by_global_slot() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, generator=g)
    ids = torch.randint(0, 1 << 40, (2, 3, 4), generator=g)
    gs = torch.randint(0, 1 << 40, (2, 3, 4), generator=g)
    v = torch.randn(2, 3, 4, 5, generator=g)
    back = unpack_candidates(torch.stack([pack_candidates(s[r], ids[r], gs[r], v[r]) for r in range(2)]))
    for a, b in zip(back, (s, ids, gs, v)):
        assert torch.equal(a, b)
    # rank 0: ids 10, 11 (slots 7, 3) and padding; rank 1: id 12 (slot 5), all scored 1.0
    scores = torch.tensor([[[1.0, 1.0, float("-inf")]], [[1.0, 0.5, float("-inf")]]])
    ids = torch.tensor([[[10, 11, -1]], [[12, 13, -1]]])
    gs = torch.tensor([[[7, 3, -1]], [[5, 9, -1]]])
    vec = torch.arange(6.0).reshape(2, 1, 3, 1).expand(2, 1, 3, 2)
    top_s, top_i, top_v = merge_candidates(scores, ids, gs, vec, 7)
    assert top_i.tolist() == [[11, 12, 10, 13, -1, -1, -1]]
    assert top_s[0, :4].tolist() == [1.0, 1.0, 1.0, 0.5] and bool((top_s[0, 4:] == float("-inf")).all())
    assert top_v[0, :, 0].tolist() == [1.0, 3.0, 0.0, 4.0, 0.0, 0.0, 0.0]


def test_wire_carries_scores_ids_and_task_logits_not_vectors(updated: RetrievalModel) -> None:
    """What one rank all-gathers is ``wire.candidate_words(T)`` int32 words per candidate (no
    vector); the reranker's vectors come whole and bit-exact from their owners, and only the
    reranker asks for them."""
    from silvertorch.distributed.wire import candidate_bytes, candidate_words

    model = updated
    T = model.value_model.num_tasks
    shards, a = split_index(model.index, 3)
    sharded = [ShardedRetrievalModel.from_model(model, s, a, rank=r).eval() for r, s in enumerate(shards)]
    q = torch.randn(4, DIM, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        packed = sharded[0].local_candidates(q, 40, None, None)
        assert packed.dtype == torch.int32 and packed.shape == (4, 40, candidate_words(T))
        assert packed[0, 0].numel() * packed.element_size() == candidate_bytes(T) < 4 * DIM
        scores, ids, _, logits = unpack_candidates(packed)
        ok = ids >= 0
        want = model.score_candidates(q, model.candidate_vectors(ids), ids)  # (B, K', T)
        assert torch.equal(logits[ok], want[ok])  # this shard's OverArch on its own candidates
        # every live item's vector is owned by exactly one shard; combining gives the exact bits
        every = model.index.ivf.slot_ids[model.index.ivf.slot_ids >= 0].reshape(1, -1)
        every = torch.cat([every, torch.tensor([[-1]])], dim=1)
        parts = torch.stack([m.owned_vectors(every) for m in sharded])  # (R, 1, N, D)
        nonzero = (parts != 0).any(-1)  # (R, 1, N)
        assert bool((nonzero.sum(0)[:, :-1] <= 1).all()) and not bool(nonzero[..., -1].any())
        assert torch.equal(combine_owned(parts), model.candidate_vectors(every))
    signed = torch.tensor([[-0.0, 1.5], [0.0, 0.0]])  # -0.0 survives (a float sum would lose it)
    assert torch.equal(combine_owned(signed).view(torch.int32), signed[0].view(torch.int32))
    # without a reranker the tail never fetches a vector
    plain = copy.copy(sharded[0])
    plain.reranker = None
    merged = merge_candidates(*unpack_candidates(packed.unsqueeze(0)), 40)

    def no_fetch(ids: torch.Tensor) -> torch.Tensor:
        raise AssertionError("fetched vectors without a reranker")

    with torch.no_grad():
        out = plain.score_merged(q, *merged, 10, None, fetch=no_fetch)
    assert out.ids.shape == (4, 10)


@pytest.mark.parametrize("which", ["base", "updated"])
def test_simulated_shards_equal_unsharded(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    kjt = user_kjt(USERS)
    weights = torch.tensor([0.2, 2.0])
    R = 3 if which == "base" else 2
    shards, a = split_index(model.index, R)
    sharded = [ShardedRetrievalModel.from_model(model, s, a, rank=r).eval() for r, s in enumerate(shards)]
    assert sharded[0].generation == model.generation
    with torch.no_grad():
        for f in FILTERS:
            for k in (10, 70):  # below and above k_prime = 40 (k = k_prime: the 2-rank launch)
                assert_same_output(simulated(sharded, kjt, k, f), model.retrieve(kjt, k, f), f"R={R} {f} k={k}")
        assert_same_output(simulated(sharded, kjt, 15, FILTERS[1], weights),
                           model.retrieve(kjt, 15, FILTERS[1], weights), "weights")


def test_single_rank_forward_and_bad_input(base: RetrievalModel) -> None:
    shards, a = split_index(base.index, 1)
    one = ShardedRetrievalModel.from_model(base, shards[0], a, rank=0).eval()
    kjt = user_kjt(USERS[:4])
    with torch.no_grad():
        assert_same_output(one(kjt, 12, ["genre:comedy"]), base.retrieve(kjt, 12, ["genre:comedy"]))
    shards2, a2 = split_index(base.index, 2)
    two = ShardedRetrievalModel.from_model(base, shards2[0], a2, rank=0).eval()
    # bad input is refused before any collective (no process group exists here)
    for kw, err in (({"k": 0}, ValueError), ({"k": 10_000}, ValueError),
                    ({"k": 5, "nprobe": 0}, ValueError),
                    ({"k": 5, "filters": ["genre:("]}, FilterSyntaxError),
                    ({"k": 5, "filters": ["genre:comedy"] * 3}, ValueError),
                    ({"k": 5, "value_weights": torch.tensor([float("nan"), 1.0])}, ValueError)):
        with pytest.raises(err):
            two(kjt, **kw)
    assert two.healthy
    with pytest.raises(ShardPeerError, match="rank 0 of 2.*not initialized"):
        two(kjt, 5)  # valid request, but no process group: a clear error, and the model is failed
    assert not two.healthy
    with pytest.raises(ShardPeerError, match="rank 0 of 2"):
        two(kjt, 5)
    with pytest.raises(ValueError, match="rank"):
        ShardedRetrievalModel.from_model(base, shards2[0], a2, rank=2)


# ----------------------------------------------------------------------------- 2 real gloo ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests() -> list[dict[str, Any]]:
    return [{"users": USERS, "k": k, "filters": f, "weights": w}
            for k, f, w in ((10, None, None), (40, FILTERS[1], None), (70, FILTERS[2], None),
                            (15, FILTERS[3], torch.tensor([0.2, 2.0])))]


def _rank_main(rank: int, world: int, port: int, bundle_path: str, out: str) -> None:
    """One spawned rank: serve every request on both models, then the failure phase."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out_dir = Path(out)
    try:
        from silvertorch.distributed.process_group import init_distributed

        init_distributed("cpu", timeout_s=60)
        import torch.distributed as dist

        silent = dist.new_group([0, 1])  # a group rank 1 never answers on: the hung-peer case
        bundle = torch.load(bundle_path, weights_only=False)
        results: dict[str, Any] = {}
        sm = None
        for name, model in bundle["models"].items():
            a = assign_clusters(model.index, world)
            sm = ShardedRetrievalModel.from_model(model, shard_index(model.index, a, rank), a,
                                                  rank=rank, timeout_s=TIMEOUT_S).eval()
            for j, req in enumerate(bundle["requests"]):
                with torch.no_grad():
                    results[f"{name}/{j}"] = tuple(sm(user_kjt(req["users"]), req["k"], req["filters"], req["weights"]))
        torch.save(results, out_dir / f"rank{rank}.pt")
        hung: dict[str, Any] = {}
        if rank == 0:  # rank 1 is alive but silent on `silent`: the wait ends at the timeout
            base_model = bundle["models"]["base"]
            a = assign_clusters(base_model.index, world)
            quiet = ShardedRetrievalModel.from_model(base_model, shard_index(base_model.index, a, 0), a,
                                                     rank=0, group=silent, timeout_s=HUNG_TIMEOUT_S)
            try:
                with torch.no_grad():
                    quiet(user_kjt(USERS[:2]), 5)
                hung = {"type": "none"}
            except Exception as err:  # noqa: BLE001 - recorded for the parent to check
                hung = {"type": type(err).__name__, "msg": str(err), "healthy": quiet.healthy}
        (out_dir / f"ready{rank}").touch()
        if rank != 0:
            time.sleep(300)  # the parent SIGKILLs this rank
            os._exit(3)
        deadline = time.monotonic() + 120
        while not (out_dir / "killed").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        errors = []
        for _ in range(2):
            try:
                with torch.no_grad():
                    sm(user_kjt(USERS[:3]), 5)
                errors.append({"type": "none"})
            except Exception as err:  # noqa: BLE001 - recorded for the parent to check
                errors.append({"type": type(err).__name__, "msg": str(err)})
        (out_dir / "failure.json").write_text(json.dumps({"errors": errors, "healthy": sm.healthy,
                                                          "hung": hung}))
    except BaseException:  # noqa: BLE001
        (out_dir / f"error{rank}.txt").write_text(traceback.format_exc())
    os._exit(0)  # no process-group teardown with a dead peer


@pytest.fixture(scope="module")
def launch(base: RetrievalModel, updated: RetrievalModel, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("sharded2")
    models = {"base": base, "updated": updated}
    reqs = _requests()
    expected = {}
    with torch.no_grad():
        for name, m in models.items():
            for j, r in enumerate(reqs):
                expected[f"{name}/{j}"] = tuple(m.retrieve(user_kjt(r["users"]), r["k"], r["filters"], r["weights"]))
    torch.save({"models": models, "requests": reqs}, out / "bundle.pt")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(out / "bundle.pt"), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240  # a hang guard, not a timing check
    while time.monotonic() < deadline:
        if all((out / f"ready{r}").exists() for r in range(2)) or list(out.glob("error*.txt")):
            break
        time.sleep(0.1)
    procs[1].kill()  # SIGKILL: no cleanup, its sockets close
    procs[1].join(30)
    (out / "killed").touch()
    procs[0].join(TIMEOUT_S + 60)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = {p.name: p.read_text() for p in out.glob("error*.txt")}
    return {"out": out, "expected": expected, "errors": errors}


def test_two_gloo_ranks_equal_unsharded(launch: dict) -> None:
    assert not launch["errors"], launch["errors"]
    for rank in range(2):
        got = torch.load(launch["out"] / f"rank{rank}.pt")
        assert set(got) == set(launch["expected"])
        for key, want in launch["expected"].items():
            assert_same_output(got[key], want, f"rank {rank} {key}")


def test_killed_peer_fails_fast_with_a_clear_error(launch: dict) -> None:
    assert not launch["errors"], launch["errors"]
    path = launch["out"] / "failure.json"
    assert path.exists(), "rank 0 hung on a dead peer (no failure report)"
    rep = json.loads(path.read_text())
    first, second = rep["errors"]
    assert first["type"] == "ShardPeerError", first
    assert "rank 0 of 2" in first["msg"] and "restart all ranks" in first["msg"]
    assert second["type"] == "ShardPeerError"  # the model stays failed: later requests fail at once
    assert rep["healthy"] is False


def test_a_silent_peer_ends_at_the_timeout_with_a_clear_error(launch: dict) -> None:
    assert not launch["errors"], launch["errors"]
    hung = json.loads((launch["out"] / "failure.json").read_text())["hung"]
    assert hung["type"] == "ShardPeerError", hung
    assert f"timeout {HUNG_TIMEOUT_S:g}s" in hung["msg"] and "rank 0 of 2" in hung["msg"]
    assert hung["healthy"] is False


def test_selectivity_aware_probing_is_refused_not_silently_ignored(base: RetrievalModel) -> None:
    """The shards hold only their own clusters' histograms: a config that probes by selectivity
    would make the sharded answer differ from the unsharded one, so it is refused by name."""
    shards, a = split_index(base.index, 2)
    model = copy.copy(base)
    model.config = dataclasses.replace(base.config, min_candidates_factor=2.0)
    with pytest.raises(ValueError, match="min_candidates_factor"):
        ShardedRetrievalModel.from_model(model, shards[0], a, rank=0)
