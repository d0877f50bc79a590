"""The console script: validate-config output and exit codes; argument errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from launch.cli import main
from silvertorch.config import from_dict, to_dict
from train.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = str(ROOT / "configs" / "movielens_100k.toml")


def test_validate_config_prints_ok_and_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate-config", "--config", SHIPPED, "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first == "OK"
    resolved = from_dict(TrainConfig, tomllib.loads(rest))  # the printout is valid TOML
    assert resolved.train.epochs == 3
    assert to_dict(resolved) == to_dict(load_train_config(SHIPPED, ["train.epochs=3"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.bogus=1", "train.bogus"),
        ("model.item_tower.mlp_dims=[0]", "model.item_tower.mlp_dims[0]"),
        ("optim.lr=fast", "optim.lr"),
    ],
)
def test_validate_config_errors_exit_2_naming_key(
    override: str, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate-config", "--config", SHIPPED, override]) == 2
    captured = capsys.readouterr()
    assert f"config key '{key}'" in captured.err
    assert "OK" not in captured.out


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_refuses_a_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c.pt"
    bad.write_bytes(b"garbage")
    code = main(["eval", "--config", SHIPPED, "--checkpoint", str(bad)])
    err = capsys.readouterr().err
    if "DataMissing" in err or "make data" in err:
        pytest.skip("MovieLens-100k not fetched")
    assert code == 1 and "not a SilverTorch checkpoint" in err


def test_module_entry_point_and_usage_errors() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "launch.cli", "validate-config", "--config", SHIPPED, "train.seed=-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "train.seed" in run.stderr
    with pytest.raises(SystemExit) as exc:
        main(["train"])  # --config is required
    assert exc.value.code == 2
