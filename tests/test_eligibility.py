"""Eligibility index: Bloom / bitmap hybrid, negation safety, verification, plan batching."""

from __future__ import annotations

import warnings as _warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from silvertorch.config import ConfigError
from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.bitmap import pack_bits, popcount, scatter_bits, unpack_bits
from silvertorch.index.bloom import expected_fpr, term_fpr
from silvertorch.index.eligibility import EligibilityConfig, EligibilityIndex
from silvertorch.index.expr import And, FilterSyntaxError, Not, Or, Term, parse
from silvertorch.index.hashing import splitmix64

GENRES = ["Action", "Children's", "Film-Noir", "Sci Fi", "Drama", "1990s"]


def catalog(n: int, seed: int, n_tags: int = 40, n_creators: int = 300) -> ItemAttributes:
    """Random multi-valued attributes: genre (1-3 of 6), tag (0-8 of n_tags), creator (0-1)."""
    g = torch.Generator().manual_seed(seed)

    def jagged(name: str, card: int, lo: int, hi: int, vocab: list[str] | None) -> Attribute:
        lengths = torch.randint(lo, hi + 1, (n,), generator=g)
        lists, start = [], 0
        flat = torch.randint(0, card, (int(lengths.sum()),), generator=g).tolist()
        for length in lengths.tolist():
            lists.append(flat[start : start + length])
            start += length
        return Attribute.from_lists(name, lists, card, vocab)

    return ItemAttributes(n, {
        "genre": jagged("genre", len(GENRES), 1, 3, GENRES),
        "tag": jagged("tag", n_tags, 0, 8, [f"t{i}" for i in range(n_tags)]),
        "creator": jagged("creator", n_creators, 0, 1, [f"creator_{i}" for i in range(n_creators)]),
    })


def exact_matches(attrs: ItemAttributes, text: str | None) -> torch.Tensor:
    """Reference: evaluate the AST per item on Python sets -> (n,) bool."""
    sets = {
        name: [set(a.values[a.offsets[i] : a.offsets[i + 1]].tolist()) for i in range(attrs.num_items)]
        for name, a in attrs.features.items()
    }

    def ev(node, i: int) -> bool:
        if isinstance(node, Term):
            if node.feature not in attrs:
                return False
            v = attrs[node.feature].value_id(node.value)
            return v is not None and v in sets[node.feature][i]
        if isinstance(node, Not):
            return not ev(node.child, i)
        if isinstance(node, And):
            return all(ev(c, i) for c in node.children)
        return any(ev(c, i) for c in node.children)

    ast = parse(text)
    return torch.tensor([True if ast is None else ev(ast, i) for i in range(attrs.num_items)])


def bits_of(words: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_bits(words, n)


# ---- low-level helpers ------------------------------------------------------------------------


def _splitmix_ref(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_splitmix64_matches_unsigned_reference() -> None:
    xs = [0, 1, 2, 12345, (1 << 63) - 1, -1, -(1 << 63), 0x0123456789ABCDEF]
    got = splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    for x, h in zip(xs, got):
        assert h & ((1 << 64) - 1) == _splitmix_ref(x & ((1 << 64) - 1))


def test_pack_scatter_unpack_popcount_agree() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 200, generator=g) < 0.3
    words = pack_bits(mask)
    assert words.shape == (3, 4)
    assert torch.equal(unpack_bits(words, 200), mask)
    r, s = mask.nonzero(as_tuple=True)
    dup_r, dup_s = torch.cat([r, r]), torch.cat([s, s])  # duplicates must not carry
    assert torch.equal(scatter_bits(3, 4, dup_r, dup_s), words)
    assert torch.equal(popcount(words).sum(1), mask.sum(1))
    top = pack_bits(torch.arange(64) == 63)  # bit 63 = slot 63 -> the sign bit of word 0
    assert top.tolist() == [-(1 << 63)]


# ---- the core property: never a false negative, exact after verification --------------------

_FEATURES = ["genre", "tag", "creator", "nosuch"]


def _leaf(feature: str, k: int) -> Term:
    if feature == "genre":
        return Term("genre", GENRES[k % len(GENRES)] if k % 7 else str(k % 6))
    if feature == "tag":
        return Term("tag", f"t{k % 40}" if k % 11 else "t999")  # t999: unknown value
    if feature == "creator":
        return Term("creator", f"creator_{k % 300}")
    return Term("nosuch", "x")


def _exprs():
    leaf = st.builds(_leaf, st.sampled_from(_FEATURES), st.integers(0, 10_000))
    return st.recursive(
        leaf,
        lambda kids: st.one_of(
            st.builds(Not, kids),
            st.builds(lambda xs: And(tuple(xs)), st.lists(kids, min_size=2, max_size=3)),
            st.builds(lambda xs: Or(tuple(xs)), st.lists(kids, min_size=2, max_size=3)),
        ),
        max_leaves=7,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    trees=st.lists(st.one_of(st.none(), _exprs()), min_size=1, max_size=6),
    hashes=st.integers(1, 3),
    bloom_all=st.booleans(),
)
def test_random_expressions_no_false_negatives_and_exact_after_verify(
    seed: int, n: int, trees: list, hashes: int, bloom_all: bool
) -> None:
    attrs = catalog(n, seed)
    # a narrow signature fills up: many false positives, the regime where NOT(Bloom) would lose items
    modes = {"tag": "bloom", "creator": "bloom", "genre": "bloom" if bloom_all else "bitmap"}
    index = EligibilityIndex.build(attrs, EligibilityConfig(modes=modes, bloom_width=64, bloom_hashes=hashes))
    texts = [None if t is None else str(t) for t in trees]
    plan = index.compile(texts)
    approx = bits_of(index.evaluate(plan), n)
    truth = torch.stack([exact_matches(attrs, t) for t in texts])
    assert not (truth & ~approx).any(), "false negative"
    slots = torch.arange(n).expand(len(texts), n)
    assert torch.equal(index.verify(plan, slots), truth)
    assert torch.equal(approx & index.verify(plan, slots), truth)
    assert torch.equal(bits_of(index.evaluate(index.compile(texts, exact=True)), n), truth)
    if index.is_exact(plan):
        assert torch.equal(approx, truth)
    # words subset == full evaluation restricted to those words, -1 -> 0
    full = index.evaluate(plan)
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-1, index.num_words, (len(texts), 5), generator=g)
    sub = index.evaluate(plan, words)
    want = torch.where(words >= 0, full.gather(1, words.clamp(min=0)), torch.zeros_like(words))
    assert torch.equal(sub, want)


def test_negated_bloom_term_keeps_every_true_match() -> None:
    """The trap: NOT over a Bloom test would drop items that are Bloom false positives."""
    n = 3000
    attrs = catalog(n, seed=7)
    index = EligibilityIndex.build(
        attrs, EligibilityConfig(modes={"tag": "bloom"}, bloom_width=64, bloom_hashes=1)
    )
    positive = index.compile(["tag:t3"])
    approx = bits_of(index.evaluate(positive), n)[0]
    truth = exact_matches(attrs, "tag:t3")
    assert (approx & ~truth).sum() > 50, "the test needs Bloom false positives to bite"
    assert not index.is_exact(positive)
    texts = ["NOT tag:t3", "NOT (tag:t3 OR NOT genre:Drama)", "genre:Drama AND NOT tag:t3"]
    plan = index.compile(texts)
    assert index.is_exact(plan)
    assert torch.equal(bits_of(index.evaluate(plan), n), torch.stack([exact_matches(attrs, t) for t in texts]))
    # a value materialized for a negation is reused, exactly, by its positive occurrences
    both = index.compile(["tag:t3", "NOT tag:t3"])
    assert index.is_exact(both) and torch.equal(bits_of(index.evaluate(both), n)[0], truth)


def test_bitmap_only_plans_are_exact() -> None:
    attrs = catalog(500, seed=3)
    index = EligibilityIndex.build(attrs, EligibilityConfig(default_mode="bitmap"))
    texts = ["genre:Action AND NOT (tag:t1 OR creator:creator_5)", "NOT genre:Drama | tag:t2", None]
    plan = index.compile(texts)
    assert index.is_exact(plan)
    assert torch.equal(bits_of(index.evaluate(plan), 500), torch.stack([exact_matches(attrs, t) for t in texts]))


# ---- unknowns, batching, errors ---------------------------------------------------------------


def test_unknown_feature_or_value_matches_nothing_and_warns() -> None:
    attrs = catalog(200, seed=1)
    index = EligibilityIndex.build(attrs, EligibilityConfig(modes={"tag": "bloom"}))
    texts = ["nosuch:x", "tag:t999", "genre:Nope", "NOT nosuch:x", "genre:Drama AND tag:t999",
             "genre:Drama OR tag:t999", "genre:999", None, "genre:1"]
    plan = index.compile(texts)
    counts = bits_of(index.evaluate(plan), 200).sum(1).tolist()
    drama = int(exact_matches(attrs, "genre:Drama").sum())
    assert counts[:3] == [0, 0, 0]
    assert counts[3] == 200  # documented: NOT of a never-matching term matches everything
    assert counts[4:7] == [0, drama, 0]
    assert counts[7] == 200 and counts[8] == int(exact_matches(attrs, "genre:1").sum())
    assert "unknown feature" in plan.warnings[0][0] and "nosuch:x" in plan.warnings[0][0]
    assert "unknown value" in plan.warnings[1][0] and "unknown value" in plan.warnings[2][0]
    assert "negated" in plan.warnings[3][0]
    assert plan.warnings[7] == [] and plan.warnings[8] == []


def test_batch_of_different_expressions_with_none_and_duplicates() -> None:
    attrs = catalog(300, seed=2)
    index = EligibilityIndex.build(attrs, EligibilityConfig(modes={"tag": "bloom", "creator": "bloom"}))
    texts = [None, "genre:Action", "", "genre:Action", "NOT creator:creator_1 AND tag:t4", None]
    plan = index.compile(texts)
    assert plan.num_programs == 3 and plan.num_rows == 6
    out = index.evaluate(plan)
    one = [index.evaluate(index.compile([t])) for t in texts]
    assert torch.equal(out, torch.cat(one))
    assert bits_of(out[0], 300).all() and not bits_of(out[0], 320)[300:].any()  # tail bits are 0


def test_compile_raises_syntax_error() -> None:
    index = EligibilityIndex.build(catalog(10, seed=0))
    with pytest.raises(FilterSyntaxError) as err:
        index.compile(["genre:Action", "genre:Action AND (tag:t1"])
    assert err.value.position == 24 and err.value.token == "<end>"
    with pytest.raises(TypeError):
        index.compile("genre:Action")  # type: ignore[arg-type]


def test_verify_padding_and_live_mask() -> None:
    n = 130
    attrs = catalog(n, seed=4)
    live = torch.ones(n, dtype=torch.bool)
    live[5] = False
    index = EligibilityIndex.build(attrs, live=live)
    plan = index.compile([None, "NOT genre:Drama"])
    slots = torch.tensor([[0, 5, -1, 129], [5, -1, 1, 2]])
    got = index.verify(plan, slots)
    drama = exact_matches(attrs, "genre:Drama")
    assert got[0].tolist() == [True, False, False, True]
    assert got[1].tolist() == [False, False, bool(~drama[1]), bool(~drama[2])]
    assert not bits_of(index.evaluate(plan), n)[:, 5].any()


# ---- configuration, persistence -----------------------------------------------------------------


def test_auto_mode_by_cardinality_and_budget() -> None:
    attrs = catalog(640, seed=5)  # 10 words -> 80 bytes per bitmap row
    cfg = EligibilityConfig(bitmap_budget_bytes=80 * 50, max_bitmap_cardinality=1000)
    assert EligibilityIndex.build(attrs, cfg).modes == {"genre": "bitmap", "tag": "bitmap", "creator": "bloom"}
    cfg = EligibilityConfig(bitmap_budget_bytes=80 * 5)
    assert EligibilityIndex.build(attrs, cfg).modes == {"genre": "bloom", "tag": "bloom", "creator": "bloom"}
    cfg = EligibilityConfig(max_bitmap_cardinality=10)
    assert EligibilityIndex.build(attrs, cfg).modes["tag"] == "bloom"
    with pytest.raises(ConfigError):
        EligibilityIndex.build(attrs, EligibilityConfig(bloom_width=100))
    with pytest.raises(ConfigError):
        EligibilityIndex.build(attrs, EligibilityConfig(modes={"nosuch": "bloom"}))


def test_state_dict_round_trip_gives_identical_results() -> None:
    attrs = catalog(400, seed=6)
    index = EligibilityIndex.build(attrs, EligibilityConfig(modes={"tag": "bloom", "creator": "bloom"}, bloom_width=128))
    texts = ["genre:\"Children's\" AND NOT tag:t3", "creator:creator_9 OR tag:t1", None, "nosuch:1"]
    restored = EligibilityIndex()
    restored.load_state_dict(index.state_dict())
    assert all(isinstance(b, torch.Tensor) for b in restored.state_dict().values())
    assert list(dict(index.named_parameters())) == []
    a, b = index.compile(texts), restored.compile(texts)
    assert torch.equal(index.evaluate(a), restored.evaluate(b))
    slots = torch.arange(400).expand(4, 400)
    assert torch.equal(index.verify(a, slots), restored.verify(b, slots))
    assert restored.modes == index.modes and a.warnings == b.warnings


# ---- false-positive rate ------------------------------------------------------------------------


def test_measured_fpr_close_to_analytical() -> None:
    n = 20_000
    attrs = catalog(n, seed=8, n_tags=2000)
    index = EligibilityIndex.build(
        attrs, EligibilityConfig(modes={"tag": "bloom", "creator": "bloom"}, bloom_width=64, bloom_hashes=3)
    )
    texts = [f"tag:t{i}" for i in range(0, 2000, 50)]
    measured = float(index.false_positive_rate(index.compile(texts)).mean())
    expected = index.expected_term_fpr()
    assert 0.01 < expected < 0.2
    assert abs(measured - expected) < 0.25 * expected
    assert term_fpr(4.0, 3, 64) == pytest.approx(expected_fpr(torch.tensor([4.0]), 3, 64))


def test_plan_to_device_and_memory_report() -> None:
    attrs = catalog(100, seed=9)
    index = EligibilityIndex.build(attrs, EligibilityConfig(modes={"creator": "bloom"}))
    plan = index.compile(["creator:creator_3 OR NOT genre:Drama", None]).to("cpu")
    assert plan.device.type == "cpu" and plan.num_rows == 2
    assert torch.equal(index.evaluate(plan), index.to("cpu").evaluate(plan))
    mem = index.memory_bytes()
    assert mem["table"] == index.table.numel() * 8 and set(mem) >= {"csr_values", "live_words"}


@pytest.mark.parametrize("block", [64, 192, 1 << 20])
def test_table_is_the_same_whatever_the_block_of_slots(monkeypatch, block: int) -> None:
    """The signature / bitmap table is OR-ed block by block of slots (bounded memory at 10M items):
    every block size gives the table of one scatter of all (row, slot) pairs."""
    import silvertorch.index.eligibility as elig_mod
    from silvertorch.index.bloom import term_rows

    attrs = catalog(1000, seed=3)
    cfg = EligibilityConfig(modes={"genre": "bitmap", "tag": "bloom", "creator": "bloom"})
    monkeypatch.setattr(elig_mod, "_BLOCK_SLOTS", block)
    table = EligibilityIndex.build(attrs, cfg).table

    # the reference: every pair's rows, one scatter (genre rows first, then the Bloom block, then ones)
    n, width, k = 1000, cfg.bloom_width, cfg.bloom_hashes
    rows, slots = [], []
    for fid, name in enumerate(attrs.features):
        a = attrs[name]
        item = torch.repeat_interleave(torch.arange(n), a.offsets[1:] - a.offsets[:-1])
        if name == "genre":
            rows.append(a.values)
            slots.append(item)
        else:
            pos = term_rows(torch.full_like(a.values, fid), a.values, k, width) + len(GENRES)
            rows.append(pos.reshape(-1))
            slots.append(item.repeat_interleave(k))
    ref = scatter_bits(len(GENRES) + width + 1, table.shape[1], torch.cat(rows), torch.cat(slots))
    ref[-1] = -1
    assert torch.equal(table, ref)
