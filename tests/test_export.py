"""The serving artifact: write -> verify -> load round trip, refusal of every kind of damage,
exported programs equal to eager, raw feature encoding with OOV."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from silvertorch.data.batching import features_to_kjt
from silvertorch.export import (
    FORMAT_VERSION,
    ArtifactError,
    check_programs,
    encode_item_features,
    encode_user_features,
    load_artifact,
    load_programs,
    sample_user_kjt,
    tensor_sha256,
    verify_artifact,
    write_artifact,
)
from silvertorch.index import ItemIndex
from silvertorch.model import RetrievalModel, TwoTower, TwoTowerConfig
from tests.test_retrieval_model import GENRES, USER_CARD, make_items, retrieval_config, tower_cfg, user_kjt

FILTERS = ["genre:comedy OR decade:1990", "NOT genre:drama", None]
USER_VOCAB = {"user_id": ["<oov>", *(f"u{i}" for i in range(1, USER_CARD["user_id"]))],
              "gender": ["<oov>", "F", "M"]}  # fmt: skip


def build(seed: int = 0, n_items: int = 300):
    """(RetrievalModel, ItemTower, item attributes) of a tiny random two-tower."""
    torch.manual_seed(seed)
    items = make_items(n_items, seed)
    item_card = {"item_id": n_items, "genre": len(GENRES)}
    two = TwoTower(TwoTowerConfig(user_tower=tower_cfg(USER_CARD), item_tower=tower_cfg(item_card)),
                   USER_CARD, item_card, num_items=n_items)
    with torch.no_grad():
        vectors = two.item_embeddings(features_to_kjt(items.features, torch.arange(n_items), ["item_id", "genre"]))
    index = ItemIndex.build(vectors, attributes=items, nlist=6, dtype="int8", seed=seed)
    model = RetrievalModel.build(retrieval_config(), two.user_tower, index, items)
    return model.eval(), two.item_tower.eval(), items


def item_vocab(items) -> dict[str, list[str]]:
    vocab = {n: list(a.vocab) for n, a in items.features.items() if a.vocab is not None}
    vocab["item_id"] = [str(i) for i in range(items.num_items)]
    return vocab


def write(out: Path, model, tower, items, **kw) -> Path:
    return write_artifact(out, model, tower, config={"note": "test"}, user_vocab=USER_VOCAB,
                          item_vocab=item_vocab(items), item_raw_ids=[f"m{i}" for i in range(items.num_items)],
                          item_titles=[f"title {i}" for i in range(items.num_items)], **kw)  # fmt: skip


@pytest.fixture(scope="module")
def built():
    return build()


@pytest.fixture(scope="module")
def artifact_dir(built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tower, items = built
    return write(tmp_path_factory.mktemp("art") / "a1", model, tower, items)


@pytest.fixture()
def copy(artifact_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact_dir, dst)
    return dst


@torch.no_grad()
def test_round_trip_gives_identical_results(built, artifact_dir: Path) -> None:
    model, tower, items = built
    art = load_artifact(artifact_dir)
    assert not art.model.training and not art.item_tower.training
    kjt = user_kjt([0, 3, 7, 11])
    for filters in (None, [FILTERS[0]], [*FILTERS, "decade:1980"]):
        a, b = model.retrieve(kjt, 30, filters), art.model.retrieve(kjt, 30, filters)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert bool((b.ids >= 0).any())
    ikjt = features_to_kjt(items.features, torch.arange(20), ["item_id", "genre"])
    assert torch.equal(tower(ikjt), art.item_tower(ikjt))
    m = art.manifest
    assert m["format_version"] == FORMAT_VERSION and art.version == m["version_id"]
    assert m["index"]["dtype"] == "int8" and m["index"]["num_items"] == 300
    assert m["tensors"]["model/index.ivf.vectors"]["sha256"] == tensor_sha256(model.index.ivf.vectors)
    assert art.item_raw_ids[5] == "m5" and art.item_titles[5] == "title 5"
    assert art.user_vocab == USER_VOCAB and m["config"]["run"] == {"note": "test"}
    assert verify_artifact(artifact_dir)["version_id"] == art.version


def test_version_ids_differ_and_existing_artifacts_are_not_overwritten(built, artifact_dir, tmp_path) -> None:
    model, tower, items = built
    with pytest.raises(FileExistsError, match="overwrite"):
        write(artifact_dir, model, tower, items, export_programs=False)
    out = write(tmp_path / "b", model, tower, items, export_programs=False)
    again = write(out, model, tower, items, export_programs=False, overwrite=True)
    v1, v2 = (json.loads((p / "manifest.json").read_text())["version_id"] for p in (artifact_dir, again))
    assert v1 != v2 and load_artifact(again).version == v2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directories left


def test_bad_inputs_write_nothing(built, tmp_path: Path) -> None:
    model, tower, items = built
    with pytest.raises(ValueError, match="item_raw_ids"):
        write_artifact(tmp_path / "x", model, tower, config={}, user_vocab=USER_VOCAB,
                       item_vocab=item_vocab(items), item_raw_ids=["a"])
    with pytest.raises(ValueError, match="gender"):
        write_artifact(tmp_path / "x", model, tower, config={}, user_vocab={"user_id": ["<oov>"]},
                       item_vocab=item_vocab(items), item_raw_ids=[str(i) for i in range(300)])
    with pytest.raises(ValueError, match="larger than their tables"):  # ids would overflow the table
        write_artifact(tmp_path / "x", model, tower, config={},
                       user_vocab={**USER_VOCAB, "gender": ["<oov>", "F", "M", "X"]},
                       item_vocab=item_vocab(items), item_raw_ids=[str(i) for i in range(300)])
    assert list(tmp_path.iterdir()) == []


def _edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_damaged_artifacts_are_refused(copy: Path) -> None:
    state = copy / "tensors.pt"
    data = bytearray(state.read_bytes())
    # a flipped byte far into the tensor file
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tensors.pt: sha256 mismatch"):
        load_artifact(copy)
    # truncated
    state.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(copy)
    with pytest.raises(ArtifactError, match="tensors.pt"):  # unverified load still fails cleanly
        load_artifact(copy, verify=False)
    state.unlink()
    with pytest.raises(ArtifactError, match="missing file 'tensors.pt'"):
        verify_artifact(copy)


def test_tampered_tensor_with_consistent_file_hash_is_refused(copy: Path, built) -> None:
    import hashlib

    state = torch.load(copy / "tensors.pt", weights_only=True)
    state["model"]["overarch.mlp.layers.0.weight"].add_(1.0)
    torch.save(state, copy / "tensors.pt")
    raw = (copy / "tensors.pt").read_bytes()
    _edit_manifest(copy, lambda m: m["files"]["tensors.pt"].update(
        sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw)))
    with pytest.raises(ArtifactError, match="overarch.mlp.layers.0.weight' sha256 mismatch"):
        load_artifact(copy)


def test_mismatched_pairing_is_refused(copy: Path, tmp_path: Path) -> None:
    """Another model's user tower with this index, every hash made consistent: the pairing id
    recomputed from the tensors differs from the manifest's."""
    import hashlib

    other, _, _ = build(seed=1)
    state = torch.load(copy / "tensors.pt", weights_only=True)
    m = json.loads((copy / "manifest.json").read_text())
    for k, v in other.user_tower.state_dict().items():
        state["model"][f"user_tower.{k}"] = v
        m["tensors"][f"model/user_tower.{k}"]["sha256"] = tensor_sha256(v)
    torch.save(state, copy / "tensors.pt")
    raw = (copy / "tensors.pt").read_bytes()
    m["files"]["tensors.pt"] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="pairing mismatch"):
        load_artifact(copy)


def test_manifest_damage_and_wrong_format_version(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match=f"format_version {FORMAT_VERSION + 1} is incompatible"):
        load_artifact(copy, verify=False)
    _edit_manifest(copy, lambda m: m.update(format_version=1))
    with pytest.raises(ArtifactError, match="format_version 1"):
        load_artifact(copy)
    _edit_manifest(copy, lambda m: m.update(format_version=FORMAT_VERSION))
    _edit_manifest(copy, lambda m: m["tensors"]["model/index.ivf.scales"].update(shape=[7]))
    with pytest.raises(ArtifactError, match="index.ivf.scales"):
        load_artifact(copy)
    _edit_manifest(copy, lambda m: m["files"].update({"../escape": {"sha256": "0", "bytes": 1}}))
    with pytest.raises(ArtifactError, match="bad file entry"):
        load_artifact(copy)
    _edit_manifest(copy, lambda m: m.update(tensors=[]))
    with pytest.raises(ArtifactError, match="lacks 'tensors'"):
        load_artifact(copy)
    (copy / "manifest.json").write_text('{"format": "silvertorch-artifact", ')
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        load_artifact(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="missing manifest.json"):
        load_artifact(copy)
    with pytest.raises(ArtifactError, match="no artifact directory"):
        load_artifact(copy / "nope")


def test_vocab_file_tampering_is_refused(copy: Path) -> None:
    vocab = json.loads((copy / "vocab.json").read_text())
    vocab["user"]["gender"][1] = "M"
    (copy / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ArtifactError, match="vocab.json"):
        load_artifact(copy)


@torch.no_grad()
def test_exported_programs_equal_eager(artifact_dir: Path) -> None:
    art = load_artifact(artifact_dir)
    progs = art.manifest["programs"]
    assert progs["user_tower"]["batch"] == "dynamic" and progs["retrieval_head"]["batch"] == "dynamic"
    assert check_programs(art, batch=5) == {"user_tower": True, "retrieval_head": True}
    assert check_programs(art, batch=2, seed=3) == {"user_tower": True, "retrieval_head": True}
    assert check_programs(art, batch=1, seed=4) == {"user_tower": True, "retrieval_head": True}


@torch.no_grad()
def test_exported_user_tower_serves_a_batch_of_one(artifact_dir: Path) -> None:
    """TorchRec's KJT code made torch.export guard ``B != 1``; the program is exported with
    size-oblivious tracing and must equal the eager tower at batch 1 (after save / load), for
    encoded requests, unknown values and a user with no features at all (``nnz = 0``)."""
    art = load_artifact(artifact_dir)
    assert art.manifest["programs"]["user_tower"]["min_batch"] == 1
    program = load_programs(art)["user_tower"].module()
    tower = art.model.user_tower
    requests = [{"user_id": "u3", "gender": "F"}, {"user_id": "nobody", "gender": ["M", "F"]},
                {"gender": "M"}, {}]  # fmt: skip
    for request in requests:
        kjt = encode_user_features(art, [request])
        got = program(kjt.values(), kjt.lengths())
        assert got.shape == (1, 8) and torch.equal(got, tower(kjt)), request
    for seed in range(3):  # random valid ids, 1-2 values per bag
        kjt = sample_user_kjt(tower, 1, seed)
        assert torch.equal(program(kjt.values(), kjt.lengths()), tower(kjt))
    # a batch of 1 stacked with others gives the same row as alone (rows are independent)
    alone = program(*_flat(encode_user_features(art, [requests[0]])))
    batch = program(*_flat(encode_user_features(art, requests)))
    torch.testing.assert_close(batch[:1], alone, rtol=1e-6, atol=1e-6)


def _flat(kjt) -> tuple[torch.Tensor, torch.Tensor]:
    return kjt.values(), kjt.lengths()


@torch.no_grad()
def test_encode_features_maps_unknown_values_to_oov(artifact_dir: Path) -> None:
    art = load_artifact(artifact_dir)
    kjt = encode_user_features(art, [{"user_id": "u3", "gender": "F"},
                                     {"user_id": "nobody", "gender": ["M", "Z"]},
                                     {"gender": "M"}])  # fmt: skip
    assert kjt.keys() == ["user_id", "gender"]
    assert kjt.lengths().tolist() == [1, 1, 0, 1, 2, 1]
    assert kjt.values().tolist() == [3, 0, 1, 2, 0, 2]
    out = art.model.retrieve(kjt, 10, ["genre:comedy"])
    assert bool((out.ids[:2] >= 0).all()) and bool(torch.isfinite(out.scores[:2]).all())
    with pytest.raises(ValueError, match="'age'"):
        encode_user_features(art, [{"user_id": "u1", "age": "30"}])
    ikjt = encode_item_features(art, [{"item_id": "7", "genre": ["comedy", "zzz"], "decade": "1990"}])
    assert ikjt.keys() == ["item_id", "genre"] and ikjt.values().tolist() == [7, GENRES.index("comedy"), 0]
    assert art.item_tower(ikjt).shape == (1, 8)
    # a plain vocabulary works the same
    plain = encode_user_features(USER_VOCAB, [{"user_id": "u3", "gender": "F"}])
    assert plain.values().tolist() == [3, 1]


# ------------------------------------------------------------------------------ CLI on MovieLens
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "movielens_100k.toml"
ML_OVERRIDES = ["data.max_users=100", "train.batch_size=256", "train.progress=false", "train.max_steps=4"]


def test_cli_export_on_movielens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main
    from silvertorch.data.fetch import DataMissingError
    from train.config import load_train_config
    from train.loop import train

    cfg = load_train_config(SHIPPED, [*ML_OVERRIDES, f"train.out_dir={tmp_path / 'run'}"])
    try:
        ckpt = train(cfg).checkpoint
    except DataMissingError as err:
        pytest.skip(f"MovieLens-100k not fetched: {err}")
    out = tmp_path / "art"
    args = ["export", "--config", str(SHIPPED), "--checkpoint", str(ckpt), "--out", str(out), *ML_OVERRIDES]
    assert main(args) == 0
    text = capsys.readouterr().out
    art = load_artifact(out)
    assert f"version    {art.version}" in text and "items      1682" in text
    assert "programs   user_tower: ok, equals eager, retrieval_head: ok, equals eager" in text
    assert art.item_titles[0] == "Toy Story (1995)" and art.item_raw_ids[0] == "1"
    assert art.manifest["meta"]["dataset"].startswith("movielens-100k")
    # raw MovieLens values in, filter honoured, unknown values served as OOV
    kjt = encode_user_features(art, [{"user_id": "1", "age_bucket": "25-34", "gender": "F", "occupation": "writer"},
                                     {"user_id": "999999", "gender": "?", "zip_prefix": "zz"}])  # fmt: skip
    out_ = art.model.retrieve(kjt, 20, ["genre:Comedy"])
    genre = art.item_vocab["genre"].index("Comedy")
    table = art.model.feature_tables()["genre"]
    ids = out_.ids[out_.ids >= 0]
    assert ids.numel() == 40 and bool((table[ids] == genre).any(dim=1).all())
    assert check_programs(art, batch=4) == {"user_tower": True, "retrieval_head": True}
    # an existing --out without --force, an unusable checkpoint, a bad config
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert main([*args[:4], str(bad), "--out", str(tmp_path / "x"), *ML_OVERRIDES]) == 1
    assert main([*args[:6], str(tmp_path / "y"), *ML_OVERRIDES, "retrieval.k_prime=0"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert main([*args, "--force", "--no-programs"]) == 0 and load_artifact(out).version != art.version


@torch.no_grad()
def test_model_with_streaming_updates_round_trips(tmp_path: Path) -> None:
    """A fresh segment, grown id space, in-place updates and tombstones all load back (the loader
    rebuilds the skeleton and the buffers take the saved shapes)."""
    from silvertorch.catalog import CatalogUpdater

    model, tower, items = build(seed=2)
    up = CatalogUpdater(model)
    g = torch.Generator().manual_seed(0)
    vecs = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    up.upsert(torch.tensor([3, 310, 311, 312, 400]), vecs,
              [{"genre": ["comedy"]}, {"genre": ["drama"], "decade": ["1990"]}, None, None, {"decade": ["1980"]}])
    up.delete(torch.tensor([5]))
    assert model.num_items > 400 and model.generation > 0
    raw = [f"m{i}" for i in range(model.num_items)]
    out = write_artifact(tmp_path / "u", model, tower, config={}, user_vocab=USER_VOCAB,
                         item_vocab=item_vocab(items), item_raw_ids=raw)
    art = load_artifact(out)
    assert art.model.generation == model.generation and art.model.num_items == model.num_items
    kjt = user_kjt([0, 1, 2, 9])
    for filters in (None, ["genre:drama OR decade:1980"]):
        a, b = model.retrieve(kjt, 50, filters, nprobe=6), art.model.retrieve(kjt, 50, filters, nprobe=6)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    found = set(b.ids.flatten().tolist())
    assert 5 not in found and found & {310, 400}  # tombstone honoured, fresh items served


def _in_file_mapping(t: torch.Tensor, path: Path) -> bool:
    """Whether ``t``'s data lies in a memory mapping of ``path`` in this process."""
    ptr, target = t.data_ptr(), str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the mappings from /proc (Linux)")
@torch.no_grad()
def test_mapped_load_equals_a_read_load_and_updates_never_reach_the_file(copy: Path) -> None:
    """``load_artifact`` maps ``tensors.pt`` (copy-on-write): the answers equal a fully read load's,
    the big buffers are views of the file rather than heap copies, and streaming updates applied to
    the mapped model change the model only: the file keeps its bytes and a reload its answers."""
    from silvertorch.catalog import CatalogUpdater

    before = (copy / "tensors.pt").read_bytes()
    mapped, read = load_artifact(copy), load_artifact(copy, mmap=False)
    kjt = user_kjt([0, 3, 7, 11])
    for filters in (None, [FILTERS[0]]):
        a, b = read.model.retrieve(kjt, 30, filters), mapped.model.retrieve(kjt, 30, filters)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a mapped tensor's bytes lie in a mapping of the file (Linux: /proc/self/maps); a read one's not
    assert _in_file_mapping(mapped.model.index.ivf.vectors, copy / "tensors.pt")
    assert _in_file_mapping(mapped.model.index.eligibility.csr_values, copy / "tensors.pt")
    assert not _in_file_mapping(read.model.index.ivf.vectors, copy / "tensors.pt")
    base = read.model.retrieve(kjt, 30, None)
    top = base.ids[0, :2]
    live = mapped.model.index.ivf.live_words
    assert _in_file_mapping(live, copy / "tensors.pt")
    up = CatalogUpdater(mapped.model)
    up.delete(top)  # tombstones: in-place writes into the mapped live bitmaps
    vecs = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    up.upsert(torch.tensor([7, 8]), vecs, [{"genre": ["comedy"]}, {"decade": ["1980"]}])
    after = mapped.model.retrieve(kjt, 30, None).ids
    assert not set(top.tolist()) & set(after[0].tolist())  # the updates took
    assert mapped.model.index.ivf.live_words.data_ptr() == live.data_ptr()  # ... in the mapped pages
    assert (copy / "tensors.pt").read_bytes() == before
    again = load_artifact(copy)
    assert all(torch.equal(x, y) for x, y in zip(base, again.model.retrieve(kjt, 30, None)))
