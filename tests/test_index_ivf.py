import pytest
import torch

from silvertorch.index import IVFIndex, ItemIndex, SearchParams
from silvertorch.index.layout import SLOT_ALIGN, unpack_words

from .test_index_search_data import clustered


@pytest.mark.parametrize("dtype", ["int8", "fp32", "bf16", "fp16"])
def test_build_layout_contract(dtype: str) -> None:
    x, _ = clustered(1000, 16, 8, 1)
    ids = torch.arange(1000, dtype=torch.int64) * 7 + 3
    ivf = IVFIndex.build(x, ids, nlist=8, dtype=dtype)
    off = ivf.cluster_offsets
    assert off[0] == 0 and off[-1] == ivf.num_slots and (off % SLOT_ALIGN == 0).all()
    assert ivf.vectors.dtype == {"int8": torch.int8, "fp32": torch.float32, "bf16": torch.bfloat16,
                                 "fp16": torch.float16}[dtype]
    live = ivf.slot_ids >= 0
    assert torch.equal(unpack_words(ivf.live_words), live)
    assert sorted(ivf.slot_ids[live].tolist()) == sorted(ids.tolist())
    # every cluster is contiguous: live slots first, then padding
    for c in range(8):
        s = ivf.slot_ids[off[c] : off[c + 1]]
        n = int((s >= 0).sum())
        assert (s[:n] >= 0).all() and (s[n:] == -1).all() and s.numel() - n < SLOT_ALIGN
    # items sit in the cluster whose centroid is nearest by inner product
    row = {int(i): r for r, i in enumerate(ids.tolist())}
    xs = x[[row[int(i)] for i in ivf.slot_ids[live]]]
    cl = torch.repeat_interleave(torch.arange(8), ivf.spans())[live]
    assert torch.equal((xs @ ivf.centroids.T).argmax(1), cl)


def test_int8_scale_and_reconstruction() -> None:
    x, _ = clustered(500, 32, 4, 1)
    ivf = IVFIndex.build(x, nlist=4, dtype="int8")
    live = ivf.slot_ids >= 0
    xs = x[ivf.slot_ids[live]]
    assert torch.allclose(ivf.scales[live], xs.abs().amax(1) / 127)
    rec = ivf.vectors[live].float() * ivf.scales[live, None]
    assert float((rec - xs).abs().max()) <= float(ivf.scales.max()) / 2 + 1e-6


def test_probe_by_inner_product_and_clamp() -> None:
    x, q = clustered(800, 8, 4, 5)
    ivf = IVFIndex.build(x, nlist=6)
    p = ivf.probe(q, 2)
    assert p.shape == (5, 2) and p.dtype == torch.int64
    assert torch.equal(p[:, 0], (q @ ivf.centroids.T).argmax(1))
    assert ivf.probe(q, 100).shape == (5, 6)  # nprobe > nlist clamps
    with pytest.raises(ValueError):
        ivf.probe(q, 0)


def test_cosine_normalizes() -> None:
    x, q = clustered(600, 8, 4, 4)
    idx = ItemIndex.build(x * 5, nlist=4, dtype="fp32", metric="cosine")
    s, i = idx.search(q * 3, 5, SearchParams(exact=True))
    xn = torch.nn.functional.normalize(x, dim=1)
    qn = torch.nn.functional.normalize(q, dim=1)
    ref = torch.topk(qn @ xn.T, 5).values
    assert torch.allclose(s, ref, atol=1e-5)


def test_nan_rejected_with_count_and_row() -> None:
    x = torch.randn(50, 4)
    x[7, 1] = float("nan")
    x[9, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 row\(s\).*first bad row: 7"):
        IVFIndex.build(x, nlist=2)


def test_bad_ids_rejected() -> None:
    with pytest.raises(ValueError, match="ids"):
        IVFIndex.build(torch.randn(10, 4), torch.arange(9), nlist=2)
    with pytest.raises(ValueError, match=">= 0"):
        IVFIndex.build(torch.randn(3, 4), torch.tensor([0, -1, 2]), nlist=2)


def test_bad_dtype_and_metric() -> None:
    with pytest.raises(ValueError, match="int8"):
        IVFIndex.build(torch.randn(10, 4), nlist=2, dtype="int4")
    with pytest.raises(ValueError, match="metric"):
        IVFIndex.build(torch.randn(10, 4), nlist=2, metric="l1")
