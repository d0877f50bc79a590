"""Catalog facts from a data set, for configs whose ``[data]`` names one (MovieLens).

The planner needs sizes only: catalog size, vocabulary sizes of the tower features, and per item
attribute its cardinality and mean values per item. ``[planner]`` keys override what is read here;
a ``synthetic`` data section has no data set and must give them in ``[planner]``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from silvertorch.planner.model_specs import AttributeSpec

__all__ = ["DataFacts", "data_facts"]


@dataclass
class DataFacts:
    num_items: int | None = None
    cardinalities: dict[str, int] = field(default_factory=dict)
    attributes: list[AttributeSpec] = field(default_factory=list)


def data_facts(config_path: str | Path) -> DataFacts:
    """Facts of the data set named by ``[data].dataset``; empty when it is not a known data set.

    Raises ``FileNotFoundError`` (from the loader) when the data has not been fetched
    (``make data``)."""
    data = tomllib.loads(Path(config_path).read_text()).get("data", {})
    name = data.get("dataset", "movielens_100k")
    from silvertorch.data import movielens

    loaders = {"movielens_100k": movielens.load_movielens_100k,
               "movielens_small": movielens.load_movielens_small}
    if name not in loaders:
        return DataFacts()
    ds = loaders[name](test_fraction=float(data.get("test_fraction", 0.1)))
    cards = {**ds.users.cardinalities(), **ds.items.cardinalities()}
    attrs = []
    for feat_name, attr in sorted(ds.items.features.features.items()):
        n = max(1, attr.offsets.numel() - 1)
        attrs.append(AttributeSpec(name=feat_name, cardinality=int(attr.cardinality),
                                   values_per_item=round(attr.values.numel() / n, 4)))
    return DataFacts(num_items=int(ds.num_items), cardinalities=cards, attributes=attrs)
