"""RetrievalModel under torch.compile and torch.export; the search custom op on its own.

``torch.compile`` with the ``aot_eager`` backend (Dynamo tracing + AOTAutograd through the op's
fake implementation) runs by default; the Inductor backend takes ~50 s on a 2-core machine and is
opt-in: ``SILVERTORCH_TEST_INDUCTOR=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from silvertorch.index import SearchParams
from silvertorch.index.ops import pack_plan, search_index, unpack_plan
from silvertorch.model import RetrievalHead
from tests.test_retrieval_model import build_model, user_kjt

FILTERS = ["genre:comedy OR decade:1990", "NOT genre:drama", None]


@pytest.fixture(scope="module")
def model():
    return build_model()


def same(a, b, exact_floats: bool = True) -> None:
    for x, y in zip(a, b):
        if exact_floats or not x.is_floating_point():
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y)


def test_search_op_equals_item_index_search(model) -> None:
    index = model.index
    q = torch.randn(3, 8)
    plan = index.eligibility.compile(FILTERS)
    for p, nprobe in ((None, 2), (plan, 3), (plan, 100)):
        want = index.search(q, 25, SearchParams(nprobe=nprobe, filter=p))
        got = search_index(index, q, 25, nprobe=nprobe, plan=p)
        same(want, got)
    tensors, ints = pack_plan(plan)
    back = unpack_plan(tensors, ints)
    assert back.lit_dst_uniform == plan.lit_dst_uniform and back.n_words == plan.n_words
    assert torch.equal(index.eligibility.evaluate(back), index.eligibility.evaluate(plan))
    assert pack_plan(None) == ([], []) and unpack_plan([], []) is None


def test_search_op_passes_opcheck(model) -> None:
    from silvertorch.index.ops import index_tensors

    ivf, metric, elig = index_tensors(model.index)
    tensors, ints = pack_plan(model.index.eligibility.compile(FILTERS))
    args = (torch.randn(3, 8), ivf, metric, elig, tensors, ints, 12, 3, True, False)
    torch.library.opcheck(torch.ops.silvertorch.ivf_search, args,
                          test_utils=("test_schema", "test_faketensor"))


@torch.no_grad()
def test_compiled_equals_eager(model) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    kjt = user_kjt([0, 3, 7])
    same(model(kjt, 10), compiled(kjt, 10))
    plan = model.index.eligibility.compile(FILTERS)
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    same(model(kjt, 10, plan, w), compiled(kjt, 10, plan, w))
    with pytest.raises(ValueError, match="finite"):
        compiled(kjt, 10, None, torch.tensor([1.0, float("nan")]))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SILVERTORCH_TEST_INDUCTOR") != "1",
                    reason="Inductor compile takes ~50 s on 2 cores; set SILVERTORCH_TEST_INDUCTOR=1")
@torch.no_grad()
def test_inductor_compiled_equals_eager(model) -> None:
    torch._dynamo.reset()
    kjt = user_kjt([0, 3, 7])
    same(model(kjt, 10), torch.compile(model)(kjt, 10), exact_floats=False)


@torch.no_grad()
def test_export_after_the_user_tower(model, tmp_path) -> None:
    q = model.user_tower(user_kjt([0, 3, 7]))
    head = RetrievalHead(model, 10)
    batch = torch.export.Dim("batch", min=1, max=256)
    ep = torch.export.export(head, (q,), dynamic_shapes={"query": {0: batch}})
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("silvertorch.ivf_search" in t for t in targets) == 1
    assert any(name.endswith("ivf.vectors") for name in ep.state_dict)  # index is in the artifact
    q5 = model.user_tower(user_kjt([1, 2, 3, 4, 5]))
    same(ep.module()(q5), model.retrieve_from_query(q5, 10))
    torch.export.save(ep, tmp_path / "head.pt2")  # the artifact round-trips
    same(torch.export.load(tmp_path / "head.pt2").module()(q5), model.retrieve_from_query(q5, 10))
    # a filter enters as the packed plan's tensors
    plan = model.index.eligibility.compile(FILTERS)
    tensors, ints = pack_plan(plan)
    fhead = RetrievalHead(model, 10, plan_ints=ints)
    w = torch.tensor([1.0, 0.2])
    ep = torch.export.export(fhead, (q, w, tensors))
    same(ep.module()(q, w, tensors), model.retrieve_from_query(q, 10, plan, w))


@torch.no_grad()
def test_full_model_exports_non_strict_with_the_torchrec_tower(model) -> None:
    kjt = user_kjt([0, 3, 7])
    ep = torch.export.export(model, (kjt, 10), strict=False)
    other = user_kjt([5, 9, 11], [1, 0, 2])
    same(ep.module()(other, 10), model(other, 10))
