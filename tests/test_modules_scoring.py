"""OverArch, value model, reranker and int8 fake quantization as standalone modules."""

from __future__ import annotations

import pytest
import torch

from silvertorch.config import ConfigError, from_dict
from silvertorch.index.quantize import decode, fake_quantize_int8_ste, quantize_rows_int8
from silvertorch.modules.overarch import OverArch, OverArchConfig
from silvertorch.modules.reranker import Reranker, RerankerConfig
from silvertorch.modules.value_model import ValueModel, ValueModelConfig

CARD = {"genre": 6, "decade": 5}


def overarch(**kw) -> OverArch:
    torch.manual_seed(0)
    cfg = OverArchConfig(tasks=["liked", "rated", "watched"], hidden_dims=[16, 8],
                         item_features=["genre", "decade"], feature_embedding_dim=4, **kw)
    return OverArch(cfg, 8, CARD)


def jagged(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return offsets, torch.tensor([v for r in rows for v in r], dtype=torch.int64)


def test_overarch_shapes_and_padding_ids_are_excluded() -> None:
    arch = overarch()
    q, e = torch.randn(2, 8), torch.randn(2, 3, 8)
    genre = [[1, 2], [], [0], [5], [3, 4], [1]]
    decade = [[1], [2], [3], [4], [0], []]
    out = arch(q, e, {"genre": jagged(genre), "decade": jagged(decade)})
    assert out.shape == (2, 3, 3) and out.dtype == torch.float32
    pad_g, pad_d = arch.padding_id("genre"), arch.padding_id("decade")
    assert (pad_g, pad_d) == (6, 5)
    width = 3
    padded = {
        "genre": jagged([r + [pad_g] * (width - len(r)) for r in genre]),
        "decade": jagged([r + [pad_d] * (width - len(r)) for r in decade]),
    }
    torch.testing.assert_close(arch(q, e, padded), out)
    with pytest.raises(KeyError, match="decade"):
        arch(q, e, {"genre": jagged(genre)})
    with pytest.raises(ValueError, match="D=8"):
        arch(torch.randn(2, 4), torch.randn(2, 3, 4), padded)


def test_overarch_input_uses_query_item_interactions() -> None:
    arch = overarch()
    feats = {"genre": jagged([[1]] * 2), "decade": jagged([[1]] * 2)}
    q = torch.randn(1, 8, requires_grad=True)
    e = torch.randn(1, 2, 8, requires_grad=True)
    arch(q, e, feats).sum().backward()
    assert q.grad is not None and e.grad is not None and bool(q.grad.abs().sum() > 0)
    assert arch.mlp.in_dim == 3 * 8 + 1 + 2 * 4


def test_overarch_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(OverArchConfig, {"tasks": []})
    assert err.value.key == "tasks"
    with pytest.raises(ConfigError) as err:
        from_dict(OverArchConfig, {"hidden_dims": [8, 0]})
    assert err.value.key == "hidden_dims[1]"
    with pytest.raises(ValueError, match="no cardinality"):
        OverArch(OverArchConfig(item_features=["language"]), 8, CARD)


def test_value_model_composite_and_overrides() -> None:
    vm = ValueModel(ValueModelConfig(tasks=["a", "b"], weights=[2.0, -1.0]))
    logits = torch.randn(3, 4, 2)
    p = torch.sigmoid(logits)
    torch.testing.assert_close(vm(logits), 2 * p[..., 0] - p[..., 1])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    torch.testing.assert_close(vm(logits, w), (p * w[:, None, :]).sum(-1))
    raw = ValueModel(ValueModelConfig(tasks=["a", "b"], weights=[1.0, 1.0], transform="logit"))
    torch.testing.assert_close(raw(logits), logits.sum(-1))


def test_value_model_weight_checks() -> None:
    vm = ValueModel(ValueModelConfig(tasks=["a", "b"], weights=[1.0, 1.0]))
    vm.check_weights(None)
    vm.check_weights(torch.ones(2))
    vm.check_weights(torch.ones(5, 2), batch_size=5)
    for bad, msg in [
        (torch.ones(3), r"shape \(2,\) or \(B, 2\)"),
        (torch.ones(2, 2, 2), "shape"),
        (torch.ones(4, 2), "expected one per query"),
        (torch.tensor([1, 2]), "floating point"),
        (torch.tensor([1.0, float("inf")]), "finite"),
        ([1.0, 2.0], "tensor"),
    ]:
        with pytest.raises(ValueError, match=msg):
            vm.check_weights(bad, batch_size=3)
    with pytest.raises(ConfigError) as err:
        from_dict(ValueModelConfig, {"tasks": ["a", "b"], "weights": [1.0]})
    assert err.value.key == "weights"
    with pytest.raises(ConfigError) as err:
        from_dict(ValueModelConfig, {"tasks": ["a"], "weights": [float("nan")]})
    assert err.value.key == "weights[0]"


def test_reranker_masks_padding_and_starts_at_identity() -> None:
    torch.manual_seed(0)
    rr = Reranker(RerankerConfig(enabled=True, num_heads=2, hidden_dim=8), dim=4, num_tasks=2)
    q, e, t = torch.randn(2, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 2)
    comp = torch.randn(2, 5)
    valid = torch.tensor([[True, True, True, False, False], [False] * 5])
    out = rr(q, e, t, comp, valid)
    torch.testing.assert_close(out[0, :3], comp[0, :3])  # zero-initialized residual
    assert bool(torch.isinf(out[~valid]).all())
    torch.nn.init.normal_(rr.head[-1].weight)
    out = rr(q, e, t, comp, valid)
    assert bool(torch.isfinite(out[valid]).all()) and not torch.allclose(out[0, :3], comp[0, :3])
    # padding content never leaks into valid scores
    e2, t2 = e.clone(), t.clone()
    e2[0, 3:], t2[0, 3:] = 100.0, -100.0
    torch.testing.assert_close(rr(q, e2, t2, comp, valid)[0, :3], out[0, :3])
    with pytest.raises(ConfigError) as err:
        RerankerConfig(num_heads=3, hidden_dim=8).validate()
    assert err.value.key == "hidden_dim"


def test_fake_quantize_matches_int8_storage_with_identity_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    x[2] = 0.0
    fq = fake_quantize_int8_ste(x)
    assert torch.equal(fq, decode(*quantize_rows_int8(x)))
    xr = x.clone().requires_grad_(True)
    c = torch.randn(6, 16)
    (fake_quantize_int8_ste(xr) * c).sum().backward()
    assert torch.equal(xr.grad, c)
    assert fake_quantize_int8_ste(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        fake_quantize_int8_ste(torch.randn(3))
