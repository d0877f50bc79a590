import pytest
import torch

from silvertorch.index import Attribute, ItemAttributes, ItemIndex, SearchParams
from silvertorch.index.layout import unpack_words
from silvertorch.index.quantize import prepare_queries
from silvertorch.index.scan import scan_reference

from .test_index_search_data import clustered, recall

# stated recall@10 thresholds vs fp32 brute force, nprobe 4 of 16 lists, 4000 x 32 clustered
RECALL = {"int8": 0.9, "bf16": 0.9, "fp16": 0.9, "fp32": 0.9}


def _truth(x: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(q @ x.T, k, dim=1).indices


@pytest.fixture(scope="module")
def data():
    return clustered(4000, 32, 16, 40, noise=0.5)


@pytest.mark.parametrize("dtype", list(RECALL))
def test_recall_per_mode(data, dtype: str) -> None:
    x, q = data
    idx = ItemIndex.build(x, nlist=16, dtype=dtype)
    truth = _truth(x, q, 10)
    _, ids = idx.search(q, 10, SearchParams(nprobe=4))
    assert recall(ids, truth) >= RECALL[dtype]
    _, ex = idx.search(q, 10, SearchParams(exact=True))
    assert recall(ex, truth) >= 0.95
    # nprobe = nlist is exhaustive: same as the exact mode
    s_all, _ = idx.search(q, 10, SearchParams(nprobe=16))
    s_ex, _ = idx.search(q, 10, SearchParams(exact=True))
    assert torch.allclose(s_all, s_ex, atol=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "fp32"])
def test_fast_equals_reference_end_to_end(data, dtype: str) -> None:
    x, q = data
    idx = ItemIndex.build(x, nlist=16, dtype=dtype)
    a = idx.search(q, 20, SearchParams(nprobe=5, engine="fast"))
    b = idx.search(q, 20, SearchParams(nprobe=5, engine="reference"))
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert (a[1] == b[1]).float().mean() > 0.99  # ties may order differently


def _with_attrs(x: torch.Tensor, seed: int = 0) -> tuple[ItemIndex, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lang = torch.randint(4, (x.shape[0],), generator=g)
    attrs = ItemAttributes(x.shape[0], {"lang": Attribute.from_single("lang", lang, 4)})
    ids = torch.arange(x.shape[0], dtype=torch.int64) + 1000
    return ItemIndex.build(x, ids, attrs, nlist=16, dtype="int8"), lang


def test_filter_results_satisfy_and_match_bruteforce(data) -> None:
    x, q = data
    idx, lang = _with_attrs(x)
    exprs = ["lang:1" if i % 2 else "lang:2 OR lang:3" for i in range(q.shape[0])]
    s, ids = idx.search(q, 10, SearchParams(nprobe=16, filter=exprs))
    allowed = [{1} if i % 2 else {2, 3} for i in range(q.shape[0])]
    for b in range(q.shape[0]):
        got = [int(i) - 1000 for i in ids[b] if i >= 0]
        assert all(int(lang[r]) in allowed[b] for r in got)
    s_ex, ids_ex = idx.search(q, 10, SearchParams(exact=True, filter=exprs))
    assert torch.allclose(s, s_ex, atol=1e-5)


def test_probe_then_filter_equals_filter_everything_on_probed(data) -> None:
    x, q = data
    idx, _ = _with_attrs(x, seed=1)
    exprs = ["lang:0 OR lang:2"] * q.shape[0]
    plan = idx.eligibility.compile(exprs)
    ivf = idx.ivf
    qf = ivf.prepare(q)
    probes = ivf.probe(qf, 3)
    words, n_eval = idx._probed_words(plan, probes)
    full = idx.eligibility.evaluate(plan)  # (B, W) every word
    off = ivf.cluster_offsets
    for b in range(q.shape[0]):
        for r in range(3):
            c = int(probes[b, r])
            w0, w1 = int(off[c]) // 64, int(off[c + 1]) // 64
            assert torch.equal(words[b, r, : w1 - w0], full[b, w0:w1])
            assert (words[b, r, w1 - w0 :] == 0).all()
    assert n_eval == int((ivf.spans()[probes] // 64).sum())
    # end to end: the search equals a reference scan with the full mask restricted to probes
    s, ids, st = idx.search_with_stats(q, 10, SearchParams(nprobe=3, filter=plan))
    assert st.words_evaluated == n_eval and st.words_total == q.shape[0] * full.shape[1]
    assert st.filter_work_saved > 1
    qc, qs = prepare_queries(qf, ivf.storage_dtype)
    rs, rslot = scan_reference(ivf.vectors, ivf.scales, off, ivf.live_words, qc, qs, probes, words)
    top = torch.topk(rs, 10, dim=1)
    assert torch.allclose(s, top.values, atol=1e-5)


def test_random_mask_probe_then_filter_via_fake_eligibility(data) -> None:
    """A simple random mask: probed-words evaluation == the full mask restricted to probed items."""
    x, q = data
    idx = ItemIndex.build(x, nlist=16, dtype="fp32")
    W = idx.ivf.num_slots // 64
    g = torch.Generator().manual_seed(5)
    full = torch.randint(-(2**62), 2**62, (q.shape[0], W), generator=g)

    class FakeElig(torch.nn.Module):
        def compile(self, exprs):
            return "plan"

        def evaluate(self, plan, words=None):
            if words is None:
                return full
            return torch.where(words >= 0, full.gather(1, words.clamp_min(0)), 0)

        def is_exact(self, plan):
            return True

    idx.eligibility = FakeElig()
    s, ids = idx.search(q, 10, SearchParams(nprobe=4, filter=["x"]))
    ivf = idx.ivf
    qf = ivf.prepare(q)
    probes = ivf.probe(qf, 4)
    allowed = unpack_words(full & ivf.live_words)  # (B, S)
    scores = (qf @ ivf.vectors.float().T)
    spans = torch.repeat_interleave(torch.arange(16), ivf.spans())
    probed = (spans[None, :] == probes[:, :, None]).any(1)
    scores = scores.masked_fill(~(allowed & probed), float("-inf"))
    ref = torch.topk(scores, 10, dim=1)
    assert torch.allclose(s, ref.values, atol=1e-5)
    assert torch.equal(ids, ivf.slot_ids[ref.indices])


def test_state_dict_round_trip_identical(data) -> None:
    x, q = data
    idx, _ = _with_attrs(x)
    p = SearchParams(nprobe=4, filter=["lang:1 OR lang:3"])
    a = idx.search(q, 10, p)
    sd = idx.state_dict()
    assert all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in sd.items())
    b = ItemIndex.from_state_dict(sd).search(q, 10, p)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # loading into an index built with different sizes works too
    other, _ = _with_attrs(x[:500])
    other.load_state_dict(sd)
    c = other.search(q, 10, p)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_to_moves_buffers(data) -> None:
    x, _ = data
    idx2 = ItemIndex.build(x[:300], nlist=4).to("cpu")
    assert idx2.ivf.vectors.device.type == "cpu"


def test_inconsistent_state_fails_clearly(data) -> None:
    x, _ = data
    idx = ItemIndex.build(x[:300], nlist=4)
    sd = idx.state_dict()
    sd["ivf.scales"] = sd["ivf.scales"][:-1]
    with pytest.raises(RuntimeError, match="scales"):
        ItemIndex.build(x[:300], nlist=4).load_state_dict(sd)


def test_bad_queries_and_k(data) -> None:
    x, q = data
    idx = ItemIndex.build(x[:500], nlist=4)
    with pytest.raises(ValueError, match=r"\(B, 32\)"):
        idx.search(q[:, :10], 5)
    with pytest.raises(ValueError, match=r"\(B, 32\)"):
        idx.search(q[0], 5)
    with pytest.raises(TypeError, match=r"\(B, 32\)"):
        idx.search(q.to(torch.int64), 5)
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be"):
            idx.search(q, k)
    with pytest.raises(ValueError, match="params.k"):
        idx.search(q, 5, SearchParams(k=torch.full((q.shape[0],), 6)))
    with pytest.raises(ValueError, match="attributes"):
        idx.search(q, 5, SearchParams(filter=["lang:1"]))


def test_k_beyond_catalog_is_padded() -> None:
    x, q = clustered(70, 8, 2, 3)
    idx = ItemIndex.build(x, nlist=3)
    s, ids = idx.search(q, 100, SearchParams(nprobe=3))
    assert s.shape == (3, 100) and ids.shape == (3, 100)
    assert ((ids >= 0).sum(1) == 70).all()
    assert torch.isinf(s[:, 70:]).all() and (ids[:, 70:] == -1).all()
    assert (s[:, :69] >= s[:, 1:70]).all()


def test_per_row_k_pads_each_row(data) -> None:
    x, q = data
    idx = ItemIndex.build(x, nlist=16)
    k_rows = torch.arange(1, q.shape[0] + 1).clamp_max(10)
    s, ids = idx.search(q, 10, SearchParams(nprobe=4, k=k_rows))
    full_s, full_ids = idx.search(q, 10, SearchParams(nprobe=4))
    for b in range(q.shape[0]):
        kb = int(k_rows[b])
        assert torch.equal(ids[b, :kb], full_ids[b, :kb])
        assert (ids[b, kb:] == -1).all()


def test_empty_catalog() -> None:
    idx = ItemIndex.build(torch.zeros(0, 8), nlist=4)
    s, ids = idx.search(torch.randn(3, 8), 5)
    assert s.shape == (3, 5) and (ids == -1).all() and torch.isinf(s).all()
    s, ids = idx.search(torch.randn(3, 8), 5, SearchParams(exact=True))
    assert (ids == -1).all()


def test_empty_clusters_and_nprobe_clamp() -> None:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    idx = ItemIndex.build(x, nlist=16, metric="cosine")  # more lists than items: most are empty
    assert int((idx.ivf.spans() == 0).sum()) >= 11
    s, ids = idx.search(x, 3, SearchParams(nprobe=1000))
    assert torch.equal(ids[:, 0], torch.arange(5))
    s2, ids2 = idx.search(x, 3, SearchParams(nprobe=1, engine="reference"))
    assert ids2.shape == (5, 3)


def test_search_does_not_mutate_index(data) -> None:
    x, q = data
    idx = ItemIndex.build(x[:800], nlist=8)
    before = {k: v.clone() for k, v in idx.state_dict().items() if isinstance(v, torch.Tensor)}
    idx.search(q, 5, SearchParams(nprobe=3))
    after = idx.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
