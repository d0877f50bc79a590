"""The joint recipe's options on the tiny synthetic catalog of ``test_joint_gradients``:
the head loss's gradient scale into the towers, skipping the user's train items among the mined
candidates, and the seed statistics of ``compare-joint --seeds``."""

from __future__ import annotations

import math

import pytest
import torch

from silvertorch.data.dataset import Interactions
from tests.test_joint_gradients import setup
from train.compare_joint import format_seed_comparison, mean_std
from train.joint_step import JointInputs, joint_loss, scale_grad
from train.mining import InteractionLabels, mine_candidates


def run(head_tower_grad: float = 1.0, skip_seen: bool = False, labels: InteractionLabels | None = None,
        train_towers: bool = True):
    two, scorer, table, default_labels, batch = setup()
    mined: list[torch.Tensor] = []

    def mine(q: torch.Tensor) -> torch.Tensor:
        mined.append(mine_candidates(scorer.index, q, 12, 3))
        return mined[-1]

    out = joint_loss(two, scorer, table, labels or default_labels, batch,
                     JointInputs(mine=mine, head_rows=4), head_loss_weight=1.0,
                     train_towers=train_towers, head_tower_grad=head_tower_grad,
                     skip_seen=skip_seen)  # fmt: skip
    if train_towers:
        out.loss.backward()
    grad = two.item_tower.ebc.embedding_bags["item_id"].weight.grad
    oa = scorer.overarch.mlp.layers[0].weight.grad
    only = sorted(set(mined[0][mined[0] >= 0].tolist()) - set(batch.item_ids.tolist()))
    return out, grad, oa, torch.tensor(only), batch


def test_scale_grad_keeps_the_forward_and_scales_the_gradient() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0])
    for s in (0.25, 1.0):
        y = scale_grad(x, s)
        torch.testing.assert_close(y, x.detach())
        (g,) = torch.autograd.grad((y * w).sum(), x)
        torch.testing.assert_close(g, s * w)
    stopped = scale_grad(x, 0.0)
    torch.testing.assert_close(stopped, x.detach())
    assert not stopped.requires_grad


def test_head_tower_grad_scales_only_the_head_path_into_the_towers() -> None:
    full, g_full, oa_full, only, _ = run(1.0)
    stop, g_stop, oa_stop, _, _ = run(0.0)
    half, g_half, _, _, _ = run(0.5)
    assert only.numel() > 5
    # same losses: the forward pass does not change
    assert math.isclose(full.stats["loss"], stop.stats["loss"], rel_tol=1e-6)
    # retrieved-only rows get gradient only through the heads: none when stopped, half at 0.5
    assert bool(g_full[only].abs().sum(1).gt(0).all())
    assert bool((g_stop[only] == 0).all())
    torch.testing.assert_close(g_half[only], 0.5 * g_full[only])
    # the OverArch still trains, with the same gradient
    assert oa_stop is not None and oa_stop.abs().sum() > 0
    torch.testing.assert_close(oa_stop, oa_full)


def test_skip_seen_ignores_the_labels_of_mined_items_the_user_rated() -> None:
    two, scorer, table, labels, batch = setup()
    # the same (user, item) pairs with other ratings: liked flips for every mined item they rate
    keys = labels.keys
    users, items = keys // labels.num_items, keys % labels.num_items
    flipped = InteractionLabels(Interactions(users, items, 6.0 - labels.ratings,
                                             torch.zeros_like(users)), labels.num_items)  # fmt: skip
    kept_a = run(skip_seen=False, train_towers=False)[0].stats
    kept_b = run(skip_seen=False, labels=flipped, train_towers=False)[0].stats
    skip_a = run(skip_seen=True, train_towers=False)[0].stats
    skip_b = run(skip_seen=True, labels=flipped, train_towers=False)[0].stats
    assert kept_a["mined_rated"] > 0  # the index did retrieve items the users rated
    assert kept_a["head_loss"] != pytest.approx(kept_b["head_loss"], rel=1e-6)
    assert skip_a["head_loss"] == pytest.approx(skip_b["head_loss"], rel=1e-6)
    assert skip_a["head_loss"] != pytest.approx(kept_a["head_loss"], rel=1e-6)


def test_seed_statistics_and_table() -> None:
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])
    joint = [{"recall@10": 0.12}, {"recall@10": 0.10}]
    two = [{"recall@10": 0.11}, {"recall@10": 0.11}]
    table = format_seed_comparison(joint, two, [0, 1])
    row = next(line for line in table.splitlines() if line.startswith("recall@10"))
    assert "0.1100 ± 0.0141" in row and "0.1100 ± 0.0000" in row and "+0.0000 ± 0.0141" in row
    assert row.rstrip().endswith("1/2")
    with pytest.raises(ValueError, match="one joint and one two-stage result per seed"):
        format_seed_comparison(joint, two[:1], [0, 1])


def test_compare_joint_takes_seeds_after_the_overrides() -> None:
    from launch.cli import build_parser
    from train.compare_joint import compare_joint_seeds

    argv = ["compare-joint", "--config", "c.toml", "joint.nlist=8", "--seeds", "0", "3"]
    args = build_parser().parse_args(argv)
    assert args.seeds == [0, 3] and args.overrides == ["joint.nlist=8"]
    assert build_parser().parse_args(["compare-joint", "--config", "c.toml"]).seeds is None
    for bad in ([], [1, 1], [-1]):  # rejected before any data is read
        with pytest.raises(ValueError, match="seeds must be distinct integers >= 0"):
            compare_joint_seeds(None, bad)  # type: ignore[arg-type]
