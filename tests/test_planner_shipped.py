"""The shipped plans in sharding_plans/ regenerate byte for byte; the CLI writes and refuses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from silvertorch.planner.shipped import SHIPPED, regenerate
from silvertorch.planner.types import Plan, PlanMismatchError

ROOT = Path(__file__).resolve().parents[1]


def _have_movielens() -> bool:
    from silvertorch.planner.data_facts import data_facts

    try:
        data_facts(ROOT / "configs/movielens_100k.toml")
    except FileNotFoundError:
        return False
    return True


def test_shipped_plans_are_up_to_date() -> None:
    if not _have_movielens():
        pytest.skip("MovieLens not fetched (make data): the MovieLens plan needs its vocabularies")
    diffs = regenerate(write=False)
    assert not diffs, (
        "sharding_plans/ differs from what the planner produces now. If the change is intended, "
        "regenerate with `.venv/bin/python -m silvertorch.planner.shipped --write`, review "
        "`git diff sharding_plans/` like code, and commit it.\n" + "\n".join(diffs)[:4000]
    )


def test_shipped_plans_take_the_expected_policy_steps() -> None:
    steps = {}
    for item in SHIPPED:
        data = json.loads((ROOT / item.out).read_text())
        steps[Path(item.out).stem] = "refused" if "error" in data else Plan.from_dict(data).step
    assert steps == {
        "movielens_100k_cpu_1": 1,
        "synthetic_80m_h100_1": "refused",
        "synthetic_80m_h100_8": 3,
        "synthetic_80m_h100_2x8": 3,
        "synthetic_600m_h100_2x8": 4,
    }
    refusal = json.loads((ROOT / "sharding_plans/synthetic_80m_h100_1.json").read_text())
    assert refusal["missing_bytes"] > 0 and "short by" in refusal["error"]
    with pytest.raises(PlanMismatchError, match="records a refusal"):
        Plan.load(ROOT / "sharding_plans/synthetic_80m_h100_1.json")


def test_cli_plan_writes_json_and_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from launch.cli import main

    out = tmp_path / "p.json"
    cfg, topo = "configs/synthetic_80m.toml", "configs/topologies/h100_8.toml"
    assert main(["plan", "--config", str(ROOT / cfg), "--topology", str(ROOT / topo),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "index.vectors" in text and "step 3" in text and "why" in text
    assert out.read_text() == (ROOT / "sharding_plans/synthetic_80m_h100_8.json").read_text()
    code = main(["plan", "--config", str(ROOT / cfg), "--topology",
                 str(ROOT / "configs/topologies/h100_1.toml")])
    assert code == 1 and "short by" in capsys.readouterr().err
    assert main(["plan", "--config", str(ROOT / cfg), "--topology", str(ROOT / topo),
                 "--items", "0"]) == 2


def test_cli_tune_keeps_the_recall_floor(capsys: pytest.CaptureFixture) -> None:
    from launch.cli import main

    assert main(["plan", "--config", str(ROOT / "configs/synthetic_80m.toml"), "--topology",
                 str(ROOT / "configs/topologies/h100_1.toml"), "--tune"]) == 0
    text = capsys.readouterr().out
    assert "recall floor: nprobe >= 64" in text
    # bf16 is refused on one H100 (see the shipped refusal); int8, listed in tune_dtypes, fits
    chosen = re.search(r"\((\d[\d,]*) items, dim 512, (\w+), nprobe (\d+)/16384\)", text)
    assert chosen is not None and chosen.group(2) == "int8" and int(chosen.group(3)) >= 64
