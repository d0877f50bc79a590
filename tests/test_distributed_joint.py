"""Sharded JOINT training (towers + OverArch, index in the loop) with 2 gloo ranks on CPU.

One module-scoped fixture runs two launches that continue each other on a tiny catalog
(8 global batches of 32 per epoch, so the index is rebuilt from the sharded item tower at step 8):
A (2 ranks, steps 1-10, DCP checkpoint, export) -> B (1 rank, resumes A, steps 11-13). The
concatenated loss curve must equal single-process ``train.joint.JointTrainer`` on the same data and
config within ``LOSS_ATOL``, and so must the OverArch attribute tables after step 10.

Tolerance: the same float32 function in another summation order (all-to-all pooling, DDP buckets,
item-tower batches of another size); measured max deviation 9.5e-07 over the 13 steps. A semantic
slip moves the loss by far more: backward on ``W * (R + J)`` (OverArch gradients counted W times)
was measured at 2e-4 at step 2, 1.9e-2 at step 3, 2.8e-1 at step 13.

The index is fp32 here: with an int8 index the STE quantization (``round(x / scale)``) is
discontinuous, so float32 rounding differences of 1e-7 occasionally flip one int8 level of one item
vector and the curves drift apart by ~1e-3 (measured: exact to 3e-6 for 6 steps, then up to 2.8e-3)
without any semantic difference. The int8 path runs in the same code (``JointPlan.quantize``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from silvertorch.config import from_dict
from silvertorch.data.dataset import EntityTable, Interactions, RecDataset
from silvertorch.index.attributes import Attribute, ItemAttributes
from tests.test_distributed_train import _ok, launch, tower_spec
from train.config import TrainConfig

NUM_USERS, NUM_ITEMS, GROUPS, TAGS = 40, 48, 4, 6
LOSS_ATOL = 1e-3
WEIGHT_ATOL = 1e-4
STEPS = (10, 13)


def joint_dataset() -> RecDataset:
    """40 users in 4 segments, 48 items in 4 genres with 1-3 tags each (a multi-valued OverArch
    feature, so bags mix real and padding ids); 256 train / 32 test events."""
    g = torch.Generator().manual_seed(1)
    users, items = torch.arange(NUM_USERS), torch.arange(NUM_ITEMS)
    tags = [[(i + j) % TAGS for j in range(1 + i % 3)] for i in range(NUM_ITEMS)]
    user_table = EntityTable(
        [str(u) for u in range(NUM_USERS)],
        ItemAttributes(NUM_USERS, {
            "user_id": Attribute.from_single("user_id", users + 1, NUM_USERS + 1),
            "segment": Attribute.from_single("segment", users % GROUPS + 1, GROUPS + 1),
        }),
    )  # fmt: skip
    item_table = EntityTable(
        [str(i) for i in range(NUM_ITEMS)],
        ItemAttributes(NUM_ITEMS, {
            "item_id": Attribute.from_single("item_id", items + 1, NUM_ITEMS + 1),
            "genre": Attribute.from_single("genre", items % GROUPS + 1, GROUPS + 1),
            "tags": Attribute.from_lists("tags", tags, TAGS),
        }),
    )  # fmt: skip

    def events(n: int) -> Interactions:
        u = torch.randint(NUM_USERS, (n,), generator=g)
        slot = torch.randint(NUM_ITEMS // GROUPS, (n,), generator=g)
        item = slot * GROUPS + u % GROUPS
        noise = torch.rand(n, generator=g) < 0.1
        item = torch.where(noise, torch.randint(NUM_ITEMS, (n,), generator=g), item)
        rating = torch.randint(1, 6, (n,), generator=g).float()
        return Interactions(u, item, rating, torch.arange(n, dtype=torch.int64))

    return RecDataset("joint", user_table, item_table, events(256), events(32))


def make_config(out_dir: Path, max_steps: int) -> TrainConfig:
    """Adagrad, no dropout, uniform negatives, learnable temperature, int8 index, hard negatives:
    every gradient path of the joint step. ``head_rows`` 24 of 32 spans both ranks' rows."""

    raw = {
        "model": {
            "user_tower": tower_spec("user", "segment"),
            "item_tower": tower_spec("item", "genre"),
            "learn_temperature": True,
            "temperature": 0.1,
            "loss": {"num_uniform_negatives": 8},
        },
        "retrieval": {
            "k_prime": 8, "nprobe": 2,
            "overarch": {"item_features": ["genre", "tags"], "hidden_dims": [16],
                         "feature_embedding_dim": 4},
        },  # fmt: skip
        "joint": {"enabled": True, "nlist": 4, "mine_k": 8, "head_rows": 24, "index_dtype": "fp32",
                  "hard_negative_weight": 0.5, "head_loss_weight": 0.5},  # fmt: skip
        "optim": {"name": "adagrad", "lr": 0.05},
        "train": {"epochs": 10, "batch_size": 32, "seed": 5, "out_dir": str(out_dir),
                  "progress": False, "max_steps": max_steps, "log_every": 100},  # fmt: skip
    }
    return from_dict(TrainConfig, raw)


def _rank_job(rank: int, out: Path, job: dict[str, Any], record: dict[str, Any]) -> None:
    from silvertorch.distributed.process_group import destroy_distributed, init_distributed
    from silvertorch.distributed.sharding import describe_plan
    from train.dist_export import export_checkpoint
    from train.distributed import DistOptions, DistTrainer

    ctx = init_distributed("cpu", timeout_s=120)
    cfg = make_config(Path(job["run_dir"]), job["max_steps"])
    opts = DistOptions(sharding_types=job.get("sharding_types"), topology=job.get("topology"))
    trainer = DistTrainer(cfg, ctx, joint_dataset(), opts)
    record["plan"] = describe_plan(trainer.plan)
    if job.get("resume"):
        record["resumed_step"] = trainer.resume()
    result = trainer.fit()
    record.update(losses=result.losses, step=result.step, index_builds=trainer.joint.index_builds)
    full = trainer.full_state()
    if rank == 0:
        torch.save(full, out / "full_end.pt")
    if job.get("export"):
        export_checkpoint(trainer, out / "exported.pt")
    destroy_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = tmp_path_factory.mktemp("dist_joint")
    run_dir = root / "run"
    topology = str(Path(__file__).resolve().parents[1] / "configs" / "topologies" / "cpu_2proc.toml")
    job = {"module": __name__, "run_dir": str(run_dir)}
    a = _ok(launch(2, root / "a", {**job, "max_steps": STEPS[0], "topology": topology, "export": True}))
    b = _ok(launch(1, root / "b", {**job, "max_steps": STEPS[1], "resume": True}))
    return {"a": a, "b": b, "root": root}


def _single_process(tmp_path: Path) -> tuple[list[float], dict[int, dict[str, torch.Tensor]]]:
    """Single-process joint training, step by step (index refreshed at epoch starts as in
    ``JointTrainer._run_epochs``); the OverArch state after each step of ``STEPS``."""
    from train.joint import JointTrainer

    single = JointTrainer(make_config(tmp_path, STEPS[-1]), joint_dataset())
    losses: list[float] = []
    states: dict[int, dict[str, torch.Tensor]] = {}
    epoch = 0
    while single.step < STEPS[-1]:
        if epoch > 0 and epoch % single.config.joint.index_refresh_every == 0:
            single.refresh_index()
        for batch in single.base.loader:
            losses.append(single.train_step(batch)["loss"])
            if single.step in STEPS:
                states[single.step] = {k: v.clone() for k, v in single.scorer.overarch.state_dict().items()}
            if single.step == STEPS[-1]:
                break
        epoch += 1
    return losses, states


def test_joint_sharded_matches_single_process(runs: dict[str, Any], tmp_path: Path) -> None:
    from silvertorch.distributed.overarch_tables import overarch_state

    sharded = runs["a"]["losses"] + runs["b"]["losses"]
    assert runs["b"]["resumed_step"] == STEPS[0] and len(sharded) == STEPS[-1]
    assert runs["a"]["index_builds"] == 2  # initial + the refresh at the start of epoch 2
    losses, states = _single_process(tmp_path)
    diffs = [abs(x - y) for x, y in zip(sharded, losses)]
    print(f"joint sharded vs single-process: max |loss difference| over {len(diffs)} steps = {max(diffs):.2e}")
    assert max(diffs) < LOSS_ATOL, " ".join(f"{d:.1e}" for d in diffs)
    got = {}
    for step, launch_name in zip(STEPS, ("a", "b")):
        full = torch.load(runs["root"] / launch_name / "full_end.pt", weights_only=True)
        got[step] = overarch_state(full, "overarch.")
        assert got[step].keys() == states[step].keys()
        for key, value in states[step].items():
            torch.testing.assert_close(got[step][key], value, atol=WEIGHT_ATOL, rtol=0, msg=f"step {step} {key}")
    table = "embeddings.tags.weight"  # the tables keep training after the 2 -> 1 rank resume
    assert not torch.equal(got[STEPS[0]][table], got[STEPS[1]][table])


def test_overarch_tables_are_sharded_by_the_plan(runs: dict[str, Any]) -> None:
    plan = runs["a"]["plan"]
    for feature in ("genre", "tags"):
        lines = [line for line in plan if f"overarch.tables.overarch__{feature}:" in line]
        assert len(lines) == 1, plan
        assert "table_wise" in lines[0] or "column_wise" in lines[0], lines[0]
        assert "fused" in lines[0], lines[0]  # model-parallel FBGEMM kernel, not data-parallel


def test_exported_joint_checkpoint_has_single_process_layout(runs: dict[str, Any], tmp_path: Path) -> None:
    """The export of the 2-rank run reads like a ``train/joint.py`` checkpoint: TwoTower weights +
    ``extra["heads"]`` with the ``OverArch`` / ``ValueModel`` state_dict keys, gathered values."""
    from silvertorch.distributed.overarch_tables import overarch_state
    from train.build_index import load_towers_and_heads
    from train.joint import JointTrainer

    cfg = make_config(tmp_path, STEPS[-1])
    two, heads = load_towers_and_heads(cfg, runs["root"] / "a" / "exported.pt", joint_dataset())
    reference = JointTrainer(cfg, joint_dataset()).scorer
    assert heads["overarch"].keys() == reference.overarch.state_dict().keys()
    assert heads["value_model"].keys() == reference.value_model.state_dict().keys()
    full = torch.load(runs["root"] / "a" / "full_end.pt", weights_only=True)
    for key, value in overarch_state(full, "overarch.").items():
        assert torch.equal(heads["overarch"][key], value), key
    for key, value in two.state_dict().items():
        assert torch.equal(value, full[key]), key


def test_padding_stripped_ebc_equals_embedding_bag() -> None:
    """Forward and table gradients of the EBC twin equal ``nn.EmbeddingBag(padding_idx=card)``
    on bags of real ids, mixed bags, all-padding bags and empty bags."""
    from silvertorch.distributed.overarch_tables import ShardableOverArch
    from silvertorch.modules.overarch import OverArch, OverArchConfig

    torch.manual_seed(0)
    cfg = OverArchConfig(item_features=["genre", "tags"], hidden_dims=[8], feature_embedding_dim=4)
    arch = OverArch(cfg, 6, {"genre": 5, "tags": 7})
    twin = ShardableOverArch(arch)
    B, K = 2, 3
    q, e = torch.randn(B, 6), torch.randn(B, K, 6)
    genre = (torch.arange(0, B * K + 1), torch.tensor([0, 5, 3, 5, 4, 1]))  # 5 = padding
    tag_lengths = torch.tensor([3, 0, 2, 1, 3, 2])  # bag 1 empty
    tag_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), tag_lengths.cumsum(0)])
    tags = (tag_offsets, torch.tensor([1, 7, 2, 7, 7, 6, 0, 3, 7, 5, 5]))  # 7 = padding; bag 2 all padding
    feats = {"genre": genre, "tags": tags}
    ref, got = arch(q, e, feats), twin(q, e, feats)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    weights = torch.randn_like(ref)
    (ref * weights).sum().backward()
    (got * weights).sum().backward()  # the MLP is shared: its gradients now hold both passes
    for f in ("genre", "tags"):
        ref_grad = arch.embeddings[f].weight.grad
        twin_grad = twin.tables.embedding_bags[f"overarch__{f}"].weight.grad
        torch.testing.assert_close(twin_grad, ref_grad, atol=1e-6, rtol=0, msg=f)
        assert float(ref_grad[-1].abs().sum()) == 0.0  # the padding row gets no gradient
