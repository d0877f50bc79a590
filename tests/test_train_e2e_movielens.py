"""End to end on a slice of MovieLens-100k: loss falls and the model beats popularity.

No wall-clock assertion; on 2 cores this takes well under a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.cli import main
from train.config import load_train_config
from train.evaluate import compare_with_popularity
from train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "movielens_100k.toml"


@pytest.mark.slow
def test_slice_trains_and_beats_popularity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from silvertorch.data.fetch import DataMissingError

    overrides = [
        "data.max_users=200",
        "train.epochs=5",
        "train.batch_size=512",
        f"train.out_dir={tmp_path}",
        "train.progress=false",
    ]
    cfg = load_train_config(SHIPPED, overrides)
    try:
        result = train(cfg)
    except DataMissingError as err:
        pytest.skip(f"MovieLens-100k not fetched: {err}")
    assert result.dataset.test.user.max() < 200
    losses = result.epoch_losses
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1, losses
    ours, pop, table = compare_with_popularity(result.model, result.dataset, cfg.eval)
    print(table)
    assert ours["recall@50"] > pop["recall@50"] * 1.1, table
    # the eval command reloads the checkpoint and reproduces the numbers
    capsys.readouterr()
    assert main(["eval", "--config", str(SHIPPED), *overrides, "--checkpoint", str(result.checkpoint)]) == 0
    out = capsys.readouterr().out
    assert f"{ours['recall@50']:.4f}" in out and f"{pop['recall@50']:.4f}" in out
