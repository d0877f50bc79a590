"""The plans shipped in ``sharding_plans/``, reviewed like code, and how to regenerate them.

``python -m silvertorch.planner.shipped --write`` rewrites them; ``--check`` (what the test runs)
fails on any difference. A config that refuses a topology ships its refusal (``"error"``) instead.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from silvertorch.planner.data_facts import data_facts
from silvertorch.planner.model_specs import load_description
from silvertorch.planner.planner import Planner
from silvertorch.planner.topology import load_topology
from silvertorch.planner.types import PlanError, _rounded

__all__ = ["SHIPPED", "ShippedPlan", "render", "render_error", "regenerate", "main"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ShippedPlan:
    config: str
    topology: str
    out: str
    items: int | None = None

    def command(self) -> str:
        items = f" --items {self.items}" if self.items else ""
        return (f"silvertorch plan --config {self.config} --topology {self.topology}{items} "
                f"--out {self.out}")


SHIPPED: tuple[ShippedPlan, ...] = (
    ShippedPlan("configs/movielens_100k.toml", "configs/topologies/cpu_1.toml",
                "sharding_plans/movielens_100k_cpu_1.json"),
    ShippedPlan("configs/synthetic_80m.toml", "configs/topologies/h100_1.toml",
                "sharding_plans/synthetic_80m_h100_1.json"),
    ShippedPlan("configs/synthetic_80m.toml", "configs/topologies/h100_8.toml",
                "sharding_plans/synthetic_80m_h100_8.json"),
    ShippedPlan("configs/synthetic_80m.toml", "configs/topologies/h100_2x8.toml",
                "sharding_plans/synthetic_80m_h100_2x8.json"),
    ShippedPlan("configs/synthetic_80m.toml", "configs/topologies/h100_2x8.toml",
                "sharding_plans/synthetic_600m_h100_2x8.json", items=600_000_000),
)


def render_error(err: PlanError, desc_name: str, topology_name: str) -> str:
    """A refusal as stable JSON (same conventions as ``Plan.to_json``)."""
    from dataclasses import asdict

    body = {"error": str(err), "missing_bytes": err.missing_bytes, "where": err.where,
            "model": desc_name, "topology": topology_name,
            "steps": [asdict(s) for s in err.steps]}
    return json.dumps(_rounded(body), indent=2, sort_keys=True) + "\n"


def render(item: ShippedPlan, root: Path = ROOT) -> str:
    facts = data_facts(root / item.config)
    desc = load_description(root / item.config, num_items=item.items or facts.num_items,
                            cardinalities=facts.cardinalities, attributes=facts.attributes)
    if item.items:
        desc = replace(desc, name=f"{desc.name}@{item.items}")
    topology = load_topology(root / item.topology)
    try:
        return Planner().plan(desc, topology).to_json()
    except PlanError as err:
        return render_error(err, desc.name, topology.name)


def regenerate(write: bool, root: Path = ROOT) -> list[str]:
    """Differences (unified diffs) between the shipped plans and fresh ones; writes if asked."""
    diffs = []
    for item in SHIPPED:
        fresh = render(item, root)
        path = root / item.out
        old = path.read_text() if path.is_file() else ""
        if old != fresh:
            diffs.append("".join(difflib.unified_diff(
                old.splitlines(True), fresh.splitlines(True), f"{item.out} (shipped)",
                f"{item.out} (regenerated)", n=2)))
            if write:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(fresh)
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite sharding_plans/*.json")
    args = parser.parse_args(argv)
    diffs = regenerate(write=args.write)
    for d in diffs:
        print(d)
    verb = "rewrote" if args.write else "differ"
    print(f"{len(diffs)} shipped plan(s) {verb}" if diffs else "shipped plans are up to date")
    return 1 if diffs and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
