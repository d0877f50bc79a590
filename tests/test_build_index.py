"""``build-index``: checkpoint -> saved RetrievalModel -> loaded model with identical results; the
demo's request path (filters, a filter matching nothing, unseen feature values, bad weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.cli import main
from train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "movielens_100k.toml"
OVERRIDES = ["data.max_users=100", "train.batch_size=256", "train.progress=false", "train.max_steps=6",
             "joint.head_rows=64", "joint.mine_k=20", "retrieval.k_prime=50"]  # fmt: skip
FILTER = "genre:Comedy AND NOT decade:1990s"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A few joint steps on a MovieLens slice: (config, checkpoint, dataset)."""
    from silvertorch.data.fetch import DataMissingError
    from train.joint import train_joint

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    out = tmp_path_factory.mktemp("joint")
    cfg = load_train_config(SHIPPED, [*OVERRIDES, f"train.out_dir={out}"])
    try:
        result = train_joint(cfg)
    except DataMissingError as err:
        pytest.skip(f"MovieLens-100k not fetched: {err}")
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    return cfg, result.checkpoint, result.dataset


@pytest.fixture(scope="module")
def built(trained, tmp_path_factory: pytest.TempPathFactory):
    from train.build_index import build_index

    cfg, ckpt, ds = trained
    model, path = build_index(cfg, ckpt, tmp_path_factory.mktemp("art") / "model.pt", dataset=ds, progress=False)
    return model, path


def user_features(ds, users: list[int]):
    from silvertorch.data.batching import FeatureTable

    return FeatureTable(ds.users.features.features, ["user_id", "age_bucket", "gender", "occupation",
                                                      "zip_prefix"]).kjt(torch.tensor(users))  # fmt: skip


@torch.no_grad()
def test_round_trip_gives_identical_results_and_keeps_the_trained_heads(trained, built) -> None:
    from train.build_index import load_retrieval_model
    from train.checkpoint import read_checkpoint

    cfg, ckpt, ds = trained
    model, path = built
    loaded, meta = load_retrieval_model(path)
    kjt = user_features(ds, [0, 5, 17, 42])
    for filters in (None, [FILTER], ["genre:Drama OR year:1980-1984", None, FILTER, "decade:1970s"]):
        a, b = model.retrieve(kjt, 30, filters), loaded.retrieve(kjt, 30, filters)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    heads = read_checkpoint(ckpt)["extra"]["heads"]["overarch"]
    assert torch.equal(loaded.overarch.state_dict()["mlp.layers.0.weight"], heads["mlp.layers.0.weight"])
    assert meta["item_titles"][0] == ds.items.titles[0] and meta["index"]["dtype"] == "int8"
    assert loaded.index.ivf.vectors.dtype == torch.int8 and loaded.index.ivf.nlist == cfg.joint.nlist
    assert loaded.index.eligibility is not None


@torch.no_grad()
def test_filtered_results_satisfy_the_expression(trained, built) -> None:
    _, _, ds = trained
    model, _ = built
    out = model.retrieve(user_features(ds, list(range(20))), 40, [FILTER], nprobe=64)
    genre, decade = ds.items.features["genre"], ds.items.features["decade"]
    comedy, nineties = genre.vocab.index("Comedy"), decade.vocab.index("1990s")
    ids = out.ids[out.ids >= 0].tolist()
    assert len(ids) > 100  # the filter leaves plenty of items
    for i in ids:
        assert comedy in genre.values[genre.offsets[i] : genre.offsets[i + 1]].tolist()
        assert int(decade.values[i]) != nineties


@torch.no_grad()
def test_demo_path_filter_matching_nothing_and_unseen_values(trained, built) -> None:
    from train.demo_retrieval import NO_MATCH_FILTER, describe_retrieval
    from train.build_index import load_retrieval_model
    from train.queries import QueryBuilder, feature_rows, sanitize_kjt

    _, _, ds = trained
    _, path = built
    model, meta = load_retrieval_model(path)
    text = describe_retrieval(model, ds, 3, meta["user_vocab"], ["genre:Film-Noir AND genre:Animation"])
    assert f"{NO_MATCH_FILTER} -> 0 results" in text and "all padding (-1 / -inf): True" in text
    assert "(no results)" in text  # Film-Noir AND Animation matches no movie of ML-100k
    # a request with values never seen in training maps them to the OOV row and still answers
    builder = QueryBuilder(meta["user_vocab"], model.user_tower.feature_names)
    kjt = builder.build([{"user_id": "no-such-user", "age_bucket": "25-34", "gender": "X",
                          "occupation": "astronaut", "zip_prefix": "99999"}])  # fmt: skip
    assert kjt.values().tolist()[0] == 0 and kjt.values().tolist()[2] == 0
    out = model.retrieve(kjt, 10, [FILTER])
    assert bool((out.ids >= 0).all()) and bool(torch.isfinite(out.scores).all())
    # an already-encoded KJT with out-of-range ids: sanitized to OOV, same answer as OOV ids
    raw = user_features(ds, [3])
    vals = raw.values().clone()
    vals[0] = 10**6
    bad = type(raw)(raw.keys(), vals, lengths=raw.lengths(), stride=1)
    vals0 = vals.clone()
    vals0[0] = 0
    oov = type(raw)(raw.keys(), vals0, lengths=raw.lengths(), stride=1)
    clean = sanitize_kjt(bad, feature_rows(model.user_tower))
    for x, y in zip(model.retrieve(clean, 10), model.retrieve(oov, 10)):
        assert torch.equal(x, y)


def test_bad_value_weights_are_rejected(trained, built) -> None:
    _, _, ds = trained
    model, _ = built
    kjt = user_features(ds, [1, 2])
    for w in (torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0])):
        with pytest.raises(ValueError, match="value weights"):
            model.retrieve(kjt, 5, value_weights=w)
    out = model.retrieve(kjt, 5, value_weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out.scores, out.task_scores[..., 0])


def test_cli_build_index_and_plain_checkpoints_get_fresh_heads(trained, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from train.build_index import load_retrieval_model
    from train.loop import train

    cfg, ckpt, _ = trained
    out = tmp_path / "m.pt"
    args = ["build-index", "--config", str(SHIPPED), "--checkpoint", str(ckpt), "--out", str(out), *OVERRIDES]
    assert main(args) == 0 and out.is_file() and "wrote" in capsys.readouterr().out
    # a plain two-tower checkpoint (no heads in it) builds with a fresh OverArch
    plain_cfg = load_train_config(SHIPPED, [*OVERRIDES, "joint.enabled=false", f"train.out_dir={tmp_path / 'p'}"])
    plain = train(plain_cfg)
    assert main([*args[:4], str(plain.checkpoint), "--out", str(tmp_path / "p.pt"), *OVERRIDES]) == 0
    model, _ = load_retrieval_model(tmp_path / "p.pt")
    assert model.overarch.num_tasks == 2
    # a corrupt checkpoint or another model config is refused with exit code 1 / 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert main([*args[:4], str(bad), "--out", str(tmp_path / "x.pt"), *OVERRIDES]) == 1
    assert "not a SilverTorch checkpoint" in capsys.readouterr().err
    other = [*OVERRIDES, "model.item_tower.mlp_dims=[64, 64]", "model.user_tower.mlp_dims=[64, 64]"]
    assert main([*args[:4], str(ckpt), "--out", str(tmp_path / "y.pt"), *other]) == 1
    assert "another model/data config" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()
