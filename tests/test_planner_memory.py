"""The planner's index arithmetic against the buffers of a real (small) built index."""

from __future__ import annotations

from silvertorch.data.synthetic import generate_catalog
from silvertorch.index.search import ItemIndex
from silvertorch.planner.model_specs import describe, model_specs


def test_index_bytes_match_a_built_index() -> None:
    items, dim, nlist = 8_000, 16, 16
    catalog = generate_catalog(items, dim, seed=0)
    index = ItemIndex.build(catalog.vectors, attributes=catalog.attributes, nlist=nlist,
                            dtype="int8", seed=0)
    measured = sum(b.numel() * b.element_size() for _, b in index.named_buffers())
    attrs = [{"name": n, "cardinality": a.cardinality,
              "values_per_item": a.values.numel() / items}
             for n, a in sorted(catalog.attributes.features.items())]
    tower = lambda f: {"features": [f], "mlp_dims": [dim],  # noqa: E731
                       "tables": [{"name": f, "features": [f], "embedding_dim": 4,
                                   "num_embeddings": 4}]}
    desc = describe({
        "model": {"user_tower": tower("u"), "item_tower": tower("i")},
        "retrieval": {"nprobe": 4, "overarch": {"tasks": ["t"]},
                      "value_model": {"tasks": ["t"], "weights": [1.0]}},
        "joint": {"nlist": nlist, "index_dtype": "int8"},
        "planner": {"num_items": items, "fresh_fraction": 0.0, "attributes": attrs},
    }, name="check")
    specs = {s.name: s.bytes for s in model_specs(desc)}
    predicted = sum(v for k, v in specs.items() if k.startswith(("index.", "eligibility.")))
    # padding is estimated (half an alignment per cluster), vocabularies at 16 bytes per value
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
    vec = index.ivf.vectors.numel() + index.ivf.scales.numel() * 4
    assert abs(specs["index.vectors"] - vec) / vec < 0.05
