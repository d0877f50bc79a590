"""``python -m train.synthetic_artifact``: a loadable, verified artifact over a synthetic catalog
whose index holds the catalog's vectors and whose filters see the catalog's attributes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silvertorch.data.synthetic import generate_catalog
from silvertorch.export import check_programs, encode_item_features, encode_user_features, load_artifact
from silvertorch.index.quantize import decode
from train.synthetic_artifact import ITEM_TOWER_FEATURES, main

N, DIM = 5000, 32


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "a"
    args = ["--items", str(N), "--dim", str(DIM), "--nlist", "32", "--users", "500", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 2  # exists, no --force
    return out


@torch.no_grad()
def test_synthetic_artifact_holds_the_catalog(art_dir: Path) -> None:
    art = load_artifact(art_dir)
    catalog = generate_catalog(N, DIM, seed=0)
    ivf = art.model.index.ivf
    assert art.model.num_items == N and ivf.nlist == 32 and ivf.vectors.dtype == torch.int8
    live = ivf.slot_ids >= 0
    stored = decode(ivf.vectors[live], ivf.scales[live])
    err = (stored - catalog.vectors[ivf.slot_ids[live]]).abs().max()
    assert float(err) < 0.02  # the index holds the catalog's vectors (int8-quantized)
    assert sorted(ivf.slot_ids[live].tolist()) == list(range(N))
    assert art.item_raw_ids[7] == "item7" and art.item_vocab["language"] == catalog.attributes["language"].vocab
    assert art.model.user_tower.output_dim == DIM and art.item_tower.feature_names == ITEM_TOWER_FEATURES


@torch.no_grad()
def test_synthetic_artifact_serves_filters_and_upsert_features(art_dir: Path) -> None:
    art = load_artifact(art_dir)
    kjt = encode_user_features(art, [{"user_id": "u3", "language": "en", "country": "us"},
                                     {"user_id": "u999999", "age_bucket": "25-34"}])  # fmt: skip
    out = art.model.retrieve(kjt, 50, ["language:en AND NOT maturity:R"], nprobe=32)
    lang = art.model.feature_tables()["language"]
    mat = art.model.feature_tables()["maturity"]
    ids = out.ids[out.ids >= 0]
    en, r = art.item_vocab["language"].index("en"), art.item_vocab["maturity"].index("R")
    assert ids.numel() == 100
    assert bool((lang[ids] == en).any(1).all()) and not bool((mat[ids] == r).any())
    item = encode_item_features(art, [{"language": "fr", "category": ["news", "?"], "tags": ["tag_3"]}])
    vec = art.item_tower(item)
    assert vec.shape == (1, DIM) and bool(torch.isfinite(vec).all())
    assert check_programs(art, batch=3) == {"user_tower": True, "retrieval_head": True}
