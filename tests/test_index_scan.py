import os

import pytest
import torch

from silvertorch.index import ItemIndex
from silvertorch.index.quantize import prepare_queries
from silvertorch.index.scan import (
    fast_accumulations,
    reference_accumulations,
    scan_fast,
    scan_reference,
)

from .test_index_search_data import clustered

DTYPES = ["int8", "fp32", "bf16", "fp16"]


def _setup(dtype: str, nprobe: int = 3, n: int = 3000, nq: int = 17, seed: int = 0):
    x, q = clustered(n, 24, 10, nq, seed=seed)
    ivf = ItemIndex.build(x, nlist=12, dtype=dtype, seed=seed).ivf
    qf = ivf.prepare(q)
    probes = ivf.probe(qf, nprobe)
    qc, qs = prepare_queries(qf, ivf.storage_dtype)
    return ivf, qc, qs, probes


def _random_pair_words(ivf, probes, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wc = int(ivf.spans()[probes].max()) // 64
    return torch.randint(-(2**62), 2**62, (*probes.shape, wc), generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("engine", ["intmm", "bmm"])
def test_fast_accumulations_match_reference(dtype: str, engine: str) -> None:
    ivf, qc, qs, probes = _setup(dtype)
    ref, slots = reference_accumulations(ivf.vectors, ivf.cluster_offsets, qc, probes)
    fast = fast_accumulations(ivf.vectors, ivf.cluster_offsets, qc, probes, engine)
    assert fast.shape == ref.shape
    if dtype == "int8":
        assert fast.dtype == torch.int64 and torch.equal(fast, ref)  # exact integer accumulation
    else:
        assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_scan_fast_contains_reference_topk(dtype: str, masked: bool, seed: int) -> None:
    ivf, qc, qs, probes = _setup(dtype, seed=seed)
    pw = _random_pair_words(ivf, probes, seed) if masked else None
    args = (ivf.vectors, ivf.scales, ivf.cluster_offsets, ivf.live_words, qc, qs, probes)
    rs, ri = scan_reference(*args, pw)
    k = torch.randint(1, 40, (qc.shape[0],), generator=torch.Generator().manual_seed(seed))
    fs, fi = scan_fast(*args, k, pw)
    for b in range(qc.shape[0]):
        kb = int(k[b])
        v, c = torch.topk(rs[b], kb)
        want = {int(s): float(x) for s, x in zip(ri[b, c], v) if x > float("-inf")}
        got = {int(s): float(x) for s, x in zip(fi[b], fs[b]) if s >= 0}
        assert set(want) <= set(got), f"row {b}: fast path lost candidates"
        for s, x in want.items():
            assert abs(got[s] - x) <= 1e-5 * max(1.0, abs(x))
        # every fast candidate is a real candidate of the reference with the same score
        ref_row = {int(s): float(x) for s, x in zip(ri[b], rs[b]) if s >= 0}
        assert set(got) <= set(ref_row)


def test_int8_intmm_and_bmm_engines_agree() -> None:
    ivf, qc, qs, probes = _setup("int8", nprobe=5)
    args = (ivf.vectors, ivf.scales, ivf.cluster_offsets, ivf.live_words, qc, qs, probes)
    k = torch.full((qc.shape[0],), 10)
    a = scan_fast(*args, k, engine="intmm")
    b = scan_fast(*args, k, engine="bmm")
    ta = torch.topk(a[0], 10).values
    tb = torch.topk(b[0], 10).values
    assert torch.equal(ta, tb)


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _triton_usable(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", ["int8", "fp32"])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_matches_reference(dtype: str, masked: bool) -> None:
    from silvertorch.index.scan_triton import scan_triton

    ivf, qc, qs, probes = _setup(dtype, n=1500, nq=4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pw = _random_pair_words(ivf, probes, 0) if masked else None
    args = (ivf.vectors, ivf.scales, ivf.cluster_offsets, ivf.live_words, qc, qs, probes)
    rs, ri = scan_reference(*args, pw)
    ts, ti = scan_triton(*(a.to(dev) for a in args), None if pw is None else pw.to(dev))
    assert torch.equal(ti.cpu(), ri)
    assert torch.allclose(ts.cpu(), rs, atol=1e-5)
