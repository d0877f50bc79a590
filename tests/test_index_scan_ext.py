"""The fused C++ CPU scan (``scan_cpu_ext``) against the plain-torch reference scan."""

from __future__ import annotations

import pytest
import torch

from silvertorch.index import ItemIndex, SearchParams
from silvertorch.index import scan_cpu_ext
from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.scan import scan_reference

from .test_index_search_data import clustered


@pytest.fixture(scope="module")
def ext():
    if not scan_cpu_ext.available():
        pytest.skip(f"fused CPU scan extension cannot be built: {scan_cpu_ext.unavailable_reason()}")
    return scan_cpu_ext


def _layout(C: int, d: int, dtype: torch.dtype, g: torch.Generator, empty_every: int = 4):
    """Random slot layout: some clusters empty, dead slots inside clusters, 64-aligned spans."""
    counts = torch.randint(1, 200, (C,), generator=g)
    counts[::empty_every] = 0
    spans = (counts + 63) // 64 * 64
    off = torch.zeros(C + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(spans, 0)
    S = int(off[-1])
    live = torch.zeros(S, dtype=torch.bool)
    for c in range(C):
        live[int(off[c]) : int(off[c]) + int(counts[c])] = True
    live &= torch.rand(S, generator=g) > 0.1  # dead slots inside clusters
    shifts = torch.arange(64, dtype=torch.int64)
    words = (live.view(-1, 64).to(torch.int64) << shifts).sum(1)
    if dtype == torch.int8:
        vec = torch.randint(-127, 128, (S, d), generator=g, dtype=torch.int8)
        scales = torch.rand(S, generator=g) * 0.02 + 1e-3
    else:
        vec = torch.randn(S, d, generator=g).to(dtype)
        scales = torch.ones(S)
    return vec, scales, off, words


def _queries(B: int, d: int, C: int, P: int, int8: bool, g: torch.Generator):
    if int8:
        qc = torch.randint(-127, 128, (B, d), generator=g, dtype=torch.int8)
        qs = torch.rand(B, generator=g) * 0.02 + 1e-3
    else:
        qc = torch.randn(B, d, generator=g)
        qs = torch.ones(B)
    probes = torch.stack([torch.randperm(C, generator=g)[:P] for _ in range(B)])
    return qc, qs, probes


def _pair_words(off: torch.Tensor, probes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    nw = (off[1:] - off[:-1]) // 64
    wc = max(int(nw[probes].max()), 1)
    pw = torch.randint(-(2**62), 2**62, (*probes.shape, wc), generator=g)
    pw[torch.rand(pw.shape, generator=g) < 0.2] = 0  # whole words ineligible
    return pw


def _check_rows(es, ei, rs, ri, k, exact: bool, tol: float = 0.0) -> None:
    """Ext rows equal the reference's best k[b] (scores bitwise or within tol; slots modulo ties)."""
    B = rs.shape[0]
    assert es.shape == ei.shape == (B, int(k.max()))
    for b in range(B):
        kb = int(k[b])
        ok = ri[b] >= 0
        ref = dict(zip(ri[b][ok].tolist(), rs[b][ok].tolist()))
        want = sorted(ref.values(), reverse=True)[:kb]
        m = len(want)
        got_s, got_i = es[b, :m].tolist(), ei[b, :m].tolist()
        # padding after the row's candidates / k
        assert bool((ei[b, m:] == -1).all()) and bool((es[b, m:] == float("-inf")).all()), f"row {b}: padding"
        assert got_s == sorted(got_s, reverse=True), f"row {b}: not sorted"
        assert len(set(got_i)) == m and all(s in ref for s in got_i), f"row {b}: bad slots"
        if exact:
            assert got_s == want, f"row {b}: scores differ from the reference"
            assert all(ref[s] == v for s, v in zip(got_i, got_s)), f"row {b}: slot scores differ"
            if m:
                # modulo ties: every slot strictly better than the k-th score must be present
                kth = want[-1]
                assert {s for s, v in ref.items() if v > kth} <= set(got_i), f"row {b}: lost a winner"
        else:
            assert torch.allclose(torch.tensor(got_s), torch.tensor(want), rtol=tol, atol=tol), f"row {b}"
            assert all(abs(ref[s] - v) <= tol * max(1.0, abs(v)) for s, v in zip(got_i, got_s))


CASES = [  # (d, C, P)
    (64, 24, 5),
    (24, 13, 4),
    (100, 9, 9),
    (130, 16, 3),
    (1, 6, 2),
]


@pytest.mark.parametrize("d,C,P", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_int8_bitwise_equal_to_reference(ext, d: int, C: int, P: int, masked: bool) -> None:
    g = torch.Generator().manual_seed(d * 1000 + C + masked)
    vec, scales, off, live = _layout(C, d, torch.int8, g)
    B = 23
    qc, qs, probes = _queries(B, d, C, P, True, g)
    pw = _pair_words(off, probes, g) if masked else None
    k = torch.randint(1, 60, (B,), generator=g)
    k[0] = 5000  # more than the candidates: padded
    k[1] = 1
    rs, ri = scan_reference(vec, scales, off, live, qc, qs, probes, pw)
    es, ei = ext.scan_ext(vec, scales, off, live, qc, qs, probes, k, pw)
    _check_rows(es, ei, rs, ri, k, exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,C,P", CASES[:3])
@pytest.mark.parametrize("masked", [False, True])
def test_float_storage_matches_reference(ext, dtype: torch.dtype, d: int, C: int, P: int, masked: bool) -> None:
    g = torch.Generator().manual_seed(d + C + masked)
    vec, scales, off, live = _layout(C, d, dtype, g)
    B = 11
    qc, qs, probes = _queries(B, d, C, P, False, g)
    if dtype == torch.bfloat16:
        qc = qc.to(torch.bfloat16)  # what prepare_queries gives for bf16 storage
    pw = _pair_words(off, probes, g) if masked else None
    k = torch.randint(1, 40, (B,), generator=g)
    k[2] = 3000
    rs, ri = scan_reference(vec, scales, off, live, qc, qs, probes, pw)
    es, ei = ext.scan_ext(vec, scales, off, live, qc, qs, probes, k, pw)
    _check_rows(es, ei, rs, ri, k, exact=False, tol=1e-4)


def test_threads_and_int_k_agree(ext) -> None:
    g = torch.Generator().manual_seed(7)
    vec, scales, off, live = _layout(32, 64, torch.int8, g)
    qc, qs, probes = _queries(64, 64, 32, 6, True, g)
    a = ext.scan_ext(vec, scales, off, live, qc, qs, probes, 17, num_threads=1)
    b = ext.scan_ext(vec, scales, off, live, qc, qs, probes, torch.full((64,), 17), num_threads=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_all_ineligible_and_empty_probes(ext) -> None:
    g = torch.Generator().manual_seed(3)
    vec, scales, off, live = _layout(8, 64, torch.int8, g, empty_every=2)
    empty = torch.nonzero(off[1:] == off[:-1]).flatten()
    qc, qs, _ = _queries(4, 64, 8, 2, True, g)
    probes = empty[:2].expand(4, -1).contiguous()  # only empty clusters
    s, i = ext.scan_ext(vec, scales, off, live, qc, qs, probes, 7)
    assert s.shape == (4, 7) and bool((i == -1).all()) and bool((s == float("-inf")).all())
    probes = torch.arange(8).expand(4, -1).contiguous()
    pw = torch.zeros(4, 8, int((off[1:] - off[:-1]).max()) // 64, dtype=torch.int64)
    s, i = ext.scan_ext(vec, scales, off, live, qc, qs, probes, 7, pw)
    assert bool((i == -1).all())


def test_fallback_when_disabled(monkeypatch) -> None:
    """With the extension unavailable, scan_ext still answers (torch path)."""
    monkeypatch.setattr(scan_cpu_ext, "_STATE", {"mod": None, "why": "test"})
    g = torch.Generator().manual_seed(5)
    vec, scales, off, live = _layout(10, 32, torch.int8, g)
    qc, qs, probes = _queries(6, 32, 10, 3, True, g)
    k = torch.randint(1, 20, (6,), generator=g)
    rs, ri = scan_reference(vec, scales, off, live, qc, qs, probes)
    es, ei = scan_cpu_ext.scan_ext(vec, scales, off, live, qc, qs, probes, k)
    _check_rows(es, ei, rs, ri, k, exact=False, tol=1e-5)


# ----------------------------------------------------------------------- through ItemIndex.search
@pytest.fixture(scope="module")
def data():
    return clustered(4000, 32, 16, 40, noise=0.5)


@pytest.mark.parametrize("dtype", ["int8", "fp32", "bf16"])
def test_search_ext_equals_reference_and_fast(ext, data, dtype: str) -> None:
    x, q = data
    idx = ItemIndex.build(x, nlist=16, dtype=dtype)
    k_rows = torch.randint(1, 21, (q.shape[0],), generator=torch.Generator().manual_seed(0))
    out = {e: idx.search(q, 20, SearchParams(nprobe=5, engine=e, k=k_rows)) for e in ("ext", "fast", "reference", "auto")}
    if dtype == "int8":
        assert torch.equal(out["ext"][0], out["reference"][0])
    assert torch.allclose(out["ext"][0], out["reference"][0], atol=1e-5)
    assert torch.allclose(out["ext"][0], out["fast"][0], atol=1e-5)
    assert torch.equal(out["auto"][0], out["ext"][0]) and torch.equal(out["auto"][1], out["ext"][1])
    assert (out["ext"][1] == out["reference"][1]).float().mean() > 0.99  # ties may order differently


def test_search_ext_with_filter(ext, data) -> None:
    x, q = data
    g = torch.Generator().manual_seed(0)
    lang = torch.randint(4, (x.shape[0],), generator=g)
    attrs = ItemAttributes(x.shape[0], {"lang": Attribute.from_single("lang", lang, 4)})
    idx = ItemIndex.build(x, None, attrs, nlist=16, dtype="int8")
    exprs = ["lang:1" if i % 2 else "lang:2 OR lang:3" for i in range(q.shape[0])]
    a = idx.search(q, 10, SearchParams(nprobe=6, filter=exprs, engine="ext"))
    b = idx.search(q, 10, SearchParams(nprobe=6, filter=exprs, engine="reference"))
    assert torch.equal(a[0], b[0])
    assert (a[1] == b[1]).float().mean() > 0.99
    allowed = [{1} if i % 2 else {2, 3} for i in range(q.shape[0])]
    for row in range(q.shape[0]):
        assert all(int(lang[int(i)]) in allowed[row] for i in a[1][row] if i >= 0)


@pytest.mark.parametrize("masked", [False, True])
def test_query_major_mode_equals_cluster_major(ext, masked: bool) -> None:
    """arena_budget=0 forces the query-major path (used for very large B * k): same results."""
    g = torch.Generator().manual_seed(11)
    vec, scales, off, live = _layout(20, 64, torch.int8, g)
    qc, qs, probes = _queries(30, 64, 20, 5, True, g)
    pw = _pair_words(off, probes, g) if masked else None
    k = torch.randint(1, 50, (30,), generator=g)
    a = ext.scan_ext(vec, scales, off, live, qc, qs, probes, k, pw)
    b = ext.scan_ext(vec, scales, off, live, qc, qs, probes, k, pw, arena_budget=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rs, ri = scan_reference(vec, scales, off, live, qc, qs, probes, pw)
    _check_rows(b[0], b[1], rs, ri, k, exact=True)
