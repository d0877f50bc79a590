"""select_topk / TopKModule against torch.topk: exact values, valid ids, per-row k, padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from silvertorch.index.topk import TopKModule, select_topk

METHODS = ["auto", "direct", "blocks", "threshold"]
NEG_INF = float("-inf")


def check_against_reference(
    scores: torch.Tensor, k: int | torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
    payload: torch.Tensor | None = None,
) -> None:
    """Values equal the reference exactly (as sorted multisets); ids point at those values."""
    B, L = scores.shape
    ks = [int(k)] * B if isinstance(k, int) else k.tolist()
    kmax = max(ks)
    assert values.shape == ids.shape == (B, kmax)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    clean = torch.where(scores.isnan(), torch.full_like(scores, NEG_INF), scores)
    for r in range(B):
        finite = clean[r][clean[r] > NEG_INF]
        n = min(ks[r], finite.numel())
        expected = torch.sort(finite, descending=True).values[:n]
        assert torch.equal(values[r, :n], expected), f"row {r}"
        assert torch.all(values[r, n:] == NEG_INF) and torch.all(ids[r, n:] == -1)
        cols = ids[r, :n] if payload is None else _columns_of(payload[r], ids[r, :n])
        assert cols.unique().numel() == n, "an entry was selected twice"
        assert torch.equal(clean[r, cols], values[r, :n])


def _columns_of(payload_row: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    position = {int(v): i for i, v in enumerate(payload_row.tolist())}
    return torch.tensor([position[int(v)] for v in picked.tolist()], dtype=torch.int64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,k", [((7, 5000), 10), ((3, 20000), 300), ((4, 9000), 4000)])
def test_matches_torch_topk(method: str, shape: tuple[int, int], k: int) -> None:
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
    values, ids = select_topk(scores, k, method=method)
    assert torch.equal(values, torch.topk(scores, k).values)
    check_against_reference(scores, k, values, ids)


@pytest.mark.parametrize("method", METHODS)
def test_ties(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (5, 6000), generator=g).float()
    for k in (1, 37, 1500):
        values, ids = select_topk(scores, k, method=method)
        check_against_reference(scores, k, values, ids)


@pytest.mark.parametrize("method", METHODS)
def test_per_row_k_and_payload(method: str) -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 10000, generator=g)
    k = torch.tensor([1, 50, 700, 3], dtype=torch.int64)
    payload = torch.randperm(40000, generator=g).view(4, 10000) + 1000
    values, ids = select_topk(scores, k, payload, method=method)
    check_against_reference(scores, k, values, ids, payload)
    assert values.shape == (4, 700)


@pytest.mark.parametrize("method", METHODS)
def test_neg_inf_and_nan_never_selected(method: str) -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 8000, generator=g)
    scores[0, 10:] = NEG_INF  # only 10 finite candidates
    scores[1, ::3] = float("nan")
    scores[2, :] = NEG_INF  # none at all
    values, ids = select_topk(scores, 100, method=method)
    check_against_reference(scores, 100, values, ids)
    assert torch.all(ids[0, 10:] == -1) and torch.all(ids[2] == -1)
    assert not values.isnan().any()


@pytest.mark.parametrize("method", METHODS)
def test_k_larger_than_row_is_padded(method: str) -> None:
    scores = torch.randn(2, 30)
    values, ids = select_topk(scores, 50, method=method)
    check_against_reference(scores, 50, values, ids)
    assert torch.all(ids[:, 30:] == -1)


def test_large_k_100k() -> None:
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 400_000, generator=g)
    for k in (100_000, torch.tensor([100_000, 1234])):
        values, ids = select_topk(scores, k)
        check_against_reference(scores, k, values, ids)


def test_threshold_fallback_on_adversarial_sample() -> None:
    """Every sampled column holds a large score: the sample threshold keeps too few; still exact."""
    k = 50_000
    stride = max(1, k // 2048)
    scores = torch.zeros(2, 200_000)
    scores[:, ::stride] = 10.0
    scores += torch.rand(2, 200_000, generator=torch.Generator().manual_seed(5)) * 1e-3
    values, ids = select_topk(scores, k, method="threshold")
    check_against_reference(scores, k, values, ids)


def test_invalid_arguments() -> None:
    scores = torch.randn(2, 10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_topk(scores, 0)
    with pytest.raises(ValueError, match="every k must be >= 1"):
        select_topk(scores, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="per-row k"):
        select_topk(scores, torch.tensor([3, 1, 2]))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        select_topk(torch.randn(10), 3)
    with pytest.raises(ValueError, match="payload"):
        select_topk(scores, 3, torch.zeros(2, 9, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64"):
        select_topk(scores, 3, torch.zeros(2, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match="method"):
        select_topk(scores, 3, method="bogus")  # type: ignore[arg-type]


def test_module_and_empty_batch() -> None:
    module = TopKModule()
    scores = torch.randn(3, 100)
    values, ids = module(scores, 5)
    check_against_reference(scores, 5, values, ids)
    values, ids = module(torch.empty(0, 100), 5)
    assert values.shape == (0, 5) and ids.shape == (0, 5)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 4),
    L=st.integers(1, 5000),
    k_frac=st.floats(0.0, 1.2),
    per_row=st.booleans(),
    levels=st.integers(2, 1000),
    neg_inf_frac=st.floats(0.0, 1.0),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(
    B: int, L: int, k_frac: float, per_row: bool, levels: int, neg_inf_frac: float,
    method: str, seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-levels, levels, (B, L), generator=g).float() / levels
    scores[torch.rand(B, L, generator=g) < neg_inf_frac] = NEG_INF
    kmax = max(1, int(k_frac * L))
    k: int | torch.Tensor = kmax
    if per_row:
        k = torch.randint(1, kmax + 1, (B,), generator=g)
    values, ids = select_topk(scores, k, method=method)  # type: ignore[arg-type]
    check_against_reference(scores, k, values, ids)
