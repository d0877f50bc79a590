"""Index-level streaming writes: bit writes, eligibility rewrites vs. a rebuild, fresh region, compaction."""

from __future__ import annotations

import pytest
import torch

from silvertorch.index import ItemIndex, SearchParams
from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.bitops import set_bits, set_table_bits
from silvertorch.index.compact import compact_index_state, eligibility_attributes
from silvertorch.index.eligibility import EligibilityConfig, EligibilityIndex
from silvertorch.index.eligibility_update import check_sets, resize_slots, rewrite_sets, set_live
from silvertorch.index import fresh
from silvertorch.index.layout import unpack_words

TAGS = [f"t{i}" for i in range(40)]


def attrs(n: int, seed: int) -> ItemAttributes:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 5, (n,), generator=g).tolist()
    tags = [sorted(set(torch.randint(0, 40, (k,), generator=g).tolist())) for k in sizes]
    color = torch.randint(-1, 4, (n,), generator=g)
    return ItemAttributes(n, {
        "tag": Attribute.from_lists("tag", tags, 40, TAGS),
        "color": Attribute.from_single("color", color, 4, ["<oov>", "red", "green", "blue"]),
    })


def sets_of(a: ItemAttributes) -> dict[str, list[list[int]]]:
    return {name: [at.values[at.offsets[i]:at.offsets[i + 1]].tolist() for i in range(a.num_items)]
            for name, at in a.features.items()}


def from_sets(sets: dict[str, list[list[int]]], proto: ItemAttributes) -> ItemAttributes:
    return ItemAttributes(len(next(iter(sets.values()))), {
        n: Attribute.from_lists(n, [sorted(set(r)) for r in rows], proto[n].cardinality, proto[n].vocab)
        for n, rows in sets.items()})


def test_set_bits_matches_python_ints() -> None:
    words = torch.zeros(3, dtype=torch.int64)
    slots = torch.tensor([0, 63, 63, 64, 130, 5])
    set_bits(words, slots, True)
    bits = unpack_words(words)
    assert torch.nonzero(bits).flatten().tolist() == [0, 5, 63, 64, 130]
    set_bits(words, torch.tensor([63, 130]), False)
    assert torch.nonzero(unpack_words(words)).flatten().tolist() == [0, 5, 64]
    table = torch.zeros(2, 2, dtype=torch.int64)
    set_table_bits(table, torch.tensor([1, 1, 0]), torch.tensor([3, 70, 3]), True)
    assert torch.nonzero(unpack_words(table)).tolist() == [[0, 3], [1, 3], [1, 70]]


@pytest.mark.parametrize("modes", [{"tag": "bloom", "color": "bitmap"}, {"tag": "bitmap", "color": "bloom"}])
def test_rewrite_and_resize_equal_a_rebuild(modes: dict[str, str]) -> None:
    """Random rewrites of attribute sets + a resize + live changes give the same buffers as
    building the eligibility index from the final sets."""
    n = 200
    base = attrs(n, 0)
    cfg = EligibilityConfig(modes=modes, bloom_width=128, bloom_hashes=3)
    elig = EligibilityIndex.build(base, cfg)
    truth = sets_of(base)
    live = torch.ones(n, dtype=torch.bool)
    resize_slots(elig, 320)
    for name in truth:
        truth[name] += [[] for _ in range(320 - n)]
    live = torch.cat([live, torch.zeros(120, dtype=torch.bool)])
    g = torch.Generator().manual_seed(1)
    names = list(truth)
    for step in range(4):
        slots = torch.randperm(320, generator=g)[:17]
        f = step % 2
        card = base[names[f]].cardinality
        new = [torch.randint(0, card, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
               for _ in range(17)]
        check_sets(elig, {f: new}, 17)
        rewrite_sets(elig, slots, {f: new})
        for s, v in zip(slots.tolist(), new):
            truth[names[f]][s] = sorted(set(v))
    on = torch.tensor([250, 260, 300])
    set_live(elig, on, True)
    live[on] = True
    set_live(elig, torch.tensor([3, 250]), False)
    live[torch.tensor([3, 250])] = False
    ref = EligibilityIndex.build(from_sets(truth, base), cfg, live=live)
    for name in ("table", "csr_offsets", "csr_values", "csc_offsets", "csc_slots", "live_words"):
        assert torch.equal(getattr(elig, name), getattr(ref, name)), name
    assert torch.equal(elig.meta[:6], ref.meta[:6]) and int(elig.meta[6]) >= int(ref.meta[6])
    exprs = ["tag:t3 OR color:red", "NOT tag:t7 AND color:blue", None]
    assert torch.equal(elig.evaluate(elig.compile(exprs)), ref.evaluate(ref.compile(exprs)))
    cand = torch.arange(320).reshape(1, -1).expand(3, -1)
    assert torch.equal(elig.verify(elig.compile(exprs), cand), ref.verify(ref.compile(exprs), cand))


def test_check_sets_rejects_out_of_range() -> None:
    elig = EligibilityIndex.build(attrs(64, 0))
    with pytest.raises(ValueError, match="out of range"):
        check_sets(elig, {0: [[40]]}, 1)
    with pytest.raises(ValueError, match="attribute sets for 2"):
        check_sets(elig, {0: [[1]]}, 2)


def _index(n: int = 500, d: int = 16, dtype: str = "int8") -> tuple[ItemIndex, torch.Tensor]:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    cfg = EligibilityConfig(modes={"tag": "bloom"})
    return ItemIndex.build(x, attributes=attrs(n, 2), nlist=8, dtype=dtype, eligibility_config=cfg), x


def test_fresh_region_is_scanned_and_grows() -> None:
    index, x = _index()
    assert not index.ivf.has_fresh
    fresh.reserve(index, 70, capacity=64)
    assert index.ivf.has_fresh and fresh.fresh_capacity(index.ivf) == 128
    assert index.eligibility.num_slots == index.ivf.num_slots
    slots = fresh.take_slots(index.ivf, 70)
    assert int(index.ivf.cluster_offsets[-1]) - index.ivf.main_slots == 128
    y = torch.randn(70, 16, generator=torch.Generator().manual_seed(5))
    codes, scales = fresh.encode_rows(index.ivf, y)
    ids = torch.arange(1000, 1070)
    fresh.write_rows(index.ivf, slots, codes, scales, ids)
    fresh.set_live(index.ivf, slots, True)
    set_live(index.eligibility, slots, True)
    def fresh_always_found(**kw) -> bool:  # k >= catalog: the probed cluster + the fresh cluster
        got = index.search(y[:4], 1000, SearchParams(nprobe=1, **kw))[1]
        n_found = (got >= 0).sum(1)
        return all(set(ids.tolist()) <= set(r.tolist()) for r in got) and bool((n_found < 500 + 70).all())
    assert fresh_always_found()
    got = index.search(y[:4], 1000, SearchParams(nprobe=1, filter=["tag:t1"]))[1]
    assert not set(got.flatten().tolist()) & set(ids.tolist())  # fresh slots have empty sets
    fresh.reserve(index, 100, capacity=64)  # reallocation keeps what was written
    assert fresh.fresh_capacity(index.ivf) == 256 and fresh.fresh_used(index.ivf) == 70
    for engine in ("reference", "fast", "ext"):
        assert fresh_always_found(engine=engine), engine
    index.ivf.validate()


def test_compaction_of_an_untouched_index_is_the_identity() -> None:
    index, _ = _index()
    state = index.state_dict()
    out, new_of_old = compact_index_state(state)
    assert set(out) == set(state)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(out[k], v), k
    live = index.ivf.slot_ids >= 0
    assert torch.equal(new_of_old[live], torch.nonzero(live).flatten())


def test_eligibility_attributes_round_trip() -> None:
    a = attrs(100, 3)
    elig = EligibilityIndex.build(a, EligibilityConfig(modes={"tag": "bloom"}))
    back, cfg = eligibility_attributes(elig)
    assert sets_of(back) == sets_of(a)
    assert cfg.modes == {"tag": "bloom", "color": "bitmap"} and back["tag"].vocab == TAGS
