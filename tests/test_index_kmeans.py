import torch

from silvertorch.index.kmeans import KMeansConfig, _repair_empty, assign, kmeans
from silvertorch.index.layout import SLOT_ALIGN, build_layout, live_words_from_ids, unpack_words

from .test_index_search_data import clustered


def test_kmeans_finds_separated_clusters() -> None:
    x, _ = clustered(4000, 16, 8, 1, noise=0.05)
    c = kmeans(x, 8, KMeansConfig(niter=15, seed=1))
    a = assign(x, c)
    counts = torch.bincount(a, minlength=8)
    assert (counts > 0).all()
    # each point is close to its centroid
    assert float((x - c[a]).norm(dim=1).mean()) < 0.2


def test_kmeans_samples_large_inputs_and_is_deterministic() -> None:
    x, _ = clustered(3000, 8, 4, 1)
    cfg = KMeansConfig(niter=3, max_points_per_centroid=10, seed=3)
    assert torch.equal(kmeans(x, 16, cfg), kmeans(x, 16, cfg))


def test_kmeans_fewer_points_than_centroids() -> None:
    x = torch.randn(5, 4)
    c = kmeans(x, 9)
    assert c.shape == (9, 4)
    assert torch.isfinite(c).all()


def test_empty_cluster_repair_splits_largest() -> None:
    c = torch.zeros(3, 2)
    c[0] = torch.tensor([1.0, 0.0])
    counts = torch.tensor([10, 0, 5])
    assert _repair_empty(c, counts, torch.Generator().manual_seed(0)) == 1
    assert not torch.equal(c[1], torch.zeros(2))
    assert float((c[1] - c[0]).norm()) < 1e-2


def test_assign_l2_and_ip() -> None:
    c = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    x = torch.tensor([[1.1, 0.0]])
    assert int(assign(x, c, "l2")) == 0
    assert int(assign(x, c, "ip")) == 1


def test_layout_is_aligned_and_contiguous() -> None:
    a = torch.tensor([2, 0, 2, 2, 0, 3])
    order, off, slots = build_layout(a, 4)
    assert off.tolist() == [0, 64, 64, 128, 192]
    assert (off % SLOT_ALIGN == 0).all()
    assert a[order].tolist() == [0, 0, 2, 2, 2, 3]
    assert slots.tolist() == [0, 1, 64, 65, 66, 128]
    ids = torch.full((192,), -1, dtype=torch.int64)
    ids[slots] = order
    words = live_words_from_ids(ids)
    assert torch.equal(unpack_words(words), ids >= 0)
