"""The planner's data types, in one place (TorchRec planner convention).

- :class:`Topology`: the hardware (hosts, devices, memories, bandwidths) and the latency budget.
- :class:`TensorSpec`: one tensor (or group) of the model, described by bytes and access pattern only
  (never materialised), with the tiers it may live in.
- :class:`Placement`: where one spec lives in a plan (tier, sharded or replicated) and why.
- :class:`StepReport`: what one policy step estimated (memory per device, latency, throughput).
- :class:`Plan`: the chosen placement of every tensor, TorchRec's table plan, and the estimates.
- :class:`PlanError`: nothing fits; says how many bytes are missing and where.

Units everywhere: bytes (int), seconds (float), bytes/second (float). The TOML files use GiB for
capacities and GB/s (1e9 bytes/s) for bandwidths; :class:`Topology` converts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from silvertorch.config import check

__all__ = [
    "GIB",
    "GB",
    "Tier",
    "Topology",
    "TensorSpec",
    "Placement",
    "StepReport",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "Proposal",
    "Partition",
    "Estimate",
    "Estimator",
    "Proposer",
    "Partitioner",
]

GIB = 1 << 30
GB = 1e9

Tier = Literal["device", "host"]
Kind = Literal["index", "dense", "table", "headroom"]


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Hardware description, loaded from ``configs/topologies/*.toml`` (see ``load_topology``).

    ``device_memory_gib`` is the memory one device computes from: HBM on a GPU; for
    ``compute_device = "cpu"`` it is the share of host DRAM one process may use, and there is no
    separate host tier (``host_memory_gib`` is then the same memory and offload is not a step).
    Bandwidths are read bandwidths in GB/s (1e9 bytes/s): ``device_bandwidth_gbps`` (HBM, or DRAM
    per process on CPU), ``host_bandwidth_gbps`` (host DRAM), ``host_to_device_gbps`` (PCIe, per
    device), ``intra_host_gbps`` (NVLink or shared memory, per device), ``inter_host_gbps``
    (network, per device). ``collective_*_us`` is the fixed cost of one collective;
    ``batch_overhead_us`` the fixed cost of one forward batch (kernel launches, Python).
    ``device_tflops`` is the dense-math rate used for the MLPs. ``latency_budget_ms`` bounds the
    latency of one batch (the latency a query sees), ``max_batch`` the queries per forward batch.
    """

    name: str
    compute_device: Literal["cpu", "cuda"]
    hosts: int = 1
    devices_per_host: int = 1
    device_memory_gib: float
    device_reserved_fraction: float = 0.1
    host_memory_gib: float
    host_reserved_fraction: float = 0.2
    device_bandwidth_gbps: float
    host_bandwidth_gbps: float
    host_to_device_gbps: float
    intra_host_gbps: float
    inter_host_gbps: float
    collective_intra_us: float = 20.0
    collective_inter_us: float = 50.0
    batch_overhead_us: float = 200.0
    device_tflops: float = 1.0
    latency_budget_ms: float = 100.0
    max_batch: int = 1024

    def validate(self) -> None:
        check(bool(self.name), "name", "a non-empty topology name")
        check(self.hosts >= 1, "hosts", f">= 1, got {self.hosts}")
        check(self.devices_per_host >= 1, "devices_per_host", f">= 1, got {self.devices_per_host}")
        for key in ("device_memory_gib", "host_memory_gib", "device_bandwidth_gbps",
                    "host_bandwidth_gbps", "host_to_device_gbps", "intra_host_gbps",
                    "inter_host_gbps", "device_tflops", "latency_budget_ms"):
            value = getattr(self, key)
            check(value > 0, key, f"> 0, got {value}")
        for key in ("device_reserved_fraction", "host_reserved_fraction"):
            value = getattr(self, key)
            check(0.0 <= value < 1.0, key, f"in [0, 1), got {value}")
        for key in ("collective_intra_us", "collective_inter_us", "batch_overhead_us"):
            value = getattr(self, key)
            check(value >= 0, key, f">= 0, got {value}")
        check(self.max_batch >= 1, "max_batch", f">= 1, got {self.max_batch}")

    # -- derived quantities (bytes, bytes/s, seconds) --------------------------------------
    @property
    def world_size(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def device_bytes(self) -> int:
        """Usable bytes of one device after the reserved fraction (activations, allocator)."""
        return int(self.device_memory_gib * GIB * (1.0 - self.device_reserved_fraction))

    @property
    def host_bytes(self) -> int:
        """Usable host DRAM of one host for offloaded tensors (0 on CPU: no separate tier)."""
        if self.compute_device == "cpu":
            return 0
        return int(self.host_memory_gib * GIB * (1.0 - self.host_reserved_fraction))

    @property
    def has_host_tier(self) -> bool:
        return self.compute_device != "cpu"

    def bandwidth(self, tier: Tier) -> float:
        """Bytes/s at which a device reads a tensor living in ``tier`` (host = over PCIe)."""
        if tier == "device":
            return self.device_bandwidth_gbps * GB
        return min(self.host_to_device_gbps, self.host_bandwidth_gbps) * GB

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One tensor (or a group of same-purpose tensors) of the model, by size and access only.

    - ``bytes``: total bytes of one full copy.
    - ``kind``: ``index`` (item-proportional, shardable by items), ``dense`` (replicated
      parameters or small index tensors), ``table`` (an embedding table placed by TorchRec),
      ``headroom`` (reserved room, e.g. the fresh segment).
    - ``shardable``: splits by items across devices (``bytes`` divide by the number of shards).
    - ``hot``: must stay in device memory when offloading (touched by every query in full).
    - ``bytes_per_query``: bytes read per query when the whole tensor is on one device (the cost
      model of ``estimate.py`` fills it in; shards read their share).
    - ``per_batch``: ``bytes_per_query`` is read once per batch instead of once per query.
    - ``sharded_drops``: not carried by the shards of a sharded index (``shards > 1``), whose model
      refuses the feature that reads it (the selectivity histograms: a shard knows only its own
      clusters' counts).
    """

    name: str
    kind: Kind
    bytes: int
    shardable: bool = False
    hot: bool = False
    bytes_per_query: float = 0.0
    per_batch: bool = False
    sharded_drops: bool = False
    note: str = ""

    def carried(self, shards: int) -> bool:
        """Whether a group of ``shards`` holds (and reads) this tensor at all."""
        return shards <= 1 or not self.sharded_drops

    def bytes_per_device(self, shards: int) -> int:
        """Bytes one device of a group of ``shards`` holds: a ``1/shards`` share (rounded up) of a
        shardable tensor, the whole of a replicated one, nothing of one it does not carry."""
        if not self.carried(shards):
            return 0
        return -(-self.bytes // shards) if self.shardable else self.bytes


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one :class:`TensorSpec` lives: tier, sharding and per-device bytes, with the reason."""

    name: str
    tier: Tier
    sharding: Literal["replicated", "item_sharded", "torchrec", "not_carried"]
    bytes_per_device: int
    reason: str
    torchrec: dict[str, Any] | None = None  # sharding_type / compute_kernel / ranks for tables


@dataclass(frozen=True, kw_only=True)
class StepReport:
    """One policy step's outcome: feasible or why not, with its estimates."""

    step: int
    name: str
    feasible: bool
    reason: str
    shards: int = 1
    device_bytes: int = 0  # the most loaded device
    host_bytes: int = 0  # per host
    latency_s: float = 0.0  # one batch (what a query waits)
    batch: int = 0
    throughput_qps: float = 0.0
    missing_bytes: int = 0
    missing_where: str = ""


@dataclass(kw_only=True)
class Plan:
    """The chosen placement under one topology, serialisable to stable JSON.

    ``model`` records what the plan was made for (``num_items``, ``dim``, ``index_dtype``, tensor
    names and bytes) so :meth:`check` can refuse a plan made for another model or world size.
    """

    topology: dict[str, Any]
    model: dict[str, Any]
    step: int
    step_name: str
    shards: int
    replicas: int
    world_size: int
    knobs: dict[str, Any]
    placements: list[Placement]
    estimates: dict[str, Any]
    steps: list[StepReport] = field(default_factory=list)
    cost_model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Stable text: sorted keys, no timestamps, floats rounded, so diffs are reviewable."""
        return json.dumps(_rounded(self.to_dict()), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if "error" in data and "placements" not in data:
            raise PlanMismatchError(f"this file records a refusal, not a plan: {data['error']}")
        try:
            placements = [Placement(**p) for p in data["placements"]]
            steps = [StepReport(**s) for s in data.get("steps", [])]
            rest = {k: v for k, v in data.items() if k not in ("placements", "steps")}
            return cls(placements=placements, steps=steps, **rest)
        except (KeyError, TypeError) as err:
            raise PlanMismatchError(f"not a SilverTorch plan: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanMismatchError(f"plan is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise PlanMismatchError("plan JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan JSON file (``sharding_plans/*.json``)."""
        p = Path(path)
        if not p.is_file():
            raise PlanMismatchError(f"plan file not found: {p}")
        return cls.from_json(p.read_text())

    def check(self, specs: "list[TensorSpec] | dict[str, Any]", world_size: int) -> None:
        """Refuse (``PlanMismatchError``) a plan made for another model or world size.

        A world of ``g * shards`` ranks (``1 <= g <= replicas``) runs ``g`` replicas of the plan.

        ``specs``: the model's tensor specs (``model_specs.model_specs(...)``) or a model summary
        dict with ``tensors: {name: bytes}``. Names every mismatch found.
        """
        problems: list[str] = []
        groups, rest = divmod(world_size, self.shards)
        if rest or not 1 <= groups <= self.replicas:
            problems.append(
                f"world size: the plan is for {self.world_size} ranks "
                f"({self.shards} shard(s) x {self.replicas} replica(s); any multiple of "
                f"{self.shards} up to {self.world_size} runs fewer replicas), got {world_size}"
            )
        want = specs["tensors"] if isinstance(specs, dict) else {s.name: s.bytes for s in specs}
        have = self.model.get("tensors", {})
        for name in sorted(set(have) | set(want)):
            if name not in want:
                problems.append(f"tensor '{name}' is in the plan but not in the model")
            elif name not in have:
                problems.append(f"tensor '{name}' is in the model but not in the plan")
            elif int(have[name]) != int(want[name]):
                problems.append(
                    f"tensor '{name}': the plan expects {int(have[name])} bytes, "
                    f"the model has {int(want[name])}"
                )
        if problems:
            raise PlanMismatchError("plan does not match: " + "; ".join(problems))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


class PlanError(RuntimeError):
    """No policy step fits. ``missing_bytes`` and ``where`` say how much memory is missing where."""

    def __init__(self, message: str, *, missing_bytes: int, where: str,
                 steps: list[StepReport] | None = None) -> None:
        self.missing_bytes = missing_bytes
        self.where = where
        self.steps = steps or []
        super().__init__(message)


class PlanMismatchError(ValueError):
    """A plan does not match the model or the world size it is applied to."""


# ---- the stages (one small abstract class each; implementations in their own files) ---------------
from abc import ABC, abstractmethod  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class Proposal:
    """One candidate placement to try: a policy step, a shard count, the index tensors sent to
    host memory (step 2), and whether TorchRec may put table rows in host memory (UVM)."""

    step: int
    name: str
    shards: int
    cold: tuple[str, ...] = ()
    tables_may_use_host: bool = False


@dataclass(kw_only=True)
class Partition:
    """A proposal laid out on devices: placements, bytes per device / host, or why it failed."""

    proposal: Proposal
    placements: list[Placement]
    device_bytes: int  # the most loaded device
    host_bytes: int  # per host (offloaded tensors, one copy per host)
    fits: bool
    reason: str
    missing_bytes: int = 0
    missing_where: str = ""
    table_kernels: dict[str, str] = field(default_factory=dict)  # table -> TorchRec kernel
    table_ranks: dict[str, int] = field(default_factory=dict)  # table -> ranks it spans


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """The cost model's answer for one partition (see ``docs/planner.md``)."""

    batch: int  # queries per forward batch chosen under the budget (0 = none fits)
    latency_s: float  # of that batch; if batch == 0, the latency of a batch of 1
    throughput_qps: float  # all replicas
    per_query_s: dict[str, float]  # time per query by component, one group
    per_batch_s: dict[str, float]  # fixed time per batch by component


class Estimator(ABC):
    """Stage 1: annotate specs with access costs, and estimate a partition's latency."""

    @abstractmethod
    def annotate(self, specs: list[TensorSpec], desc: Any) -> list[TensorSpec]:
        """``specs`` with ``bytes_per_query`` filled in (one query, the whole catalog)."""

    @abstractmethod
    def estimate(self, partition: Partition, specs: list[TensorSpec], desc: Any,
                 topology: Topology) -> Estimate:
        """Latency / throughput of ``partition`` on ``topology``."""


class Proposer(ABC):
    """Stage 2: candidate placements in policy order (scale up first, then out)."""

    @abstractmethod
    def propose(self, specs: list[TensorSpec], topology: Topology) -> list[Proposal]:
        """Proposals, cheapest step first."""


class Partitioner(ABC):
    """Stage 3: lay a proposal out on devices (index by us, tables by TorchRec)."""

    @abstractmethod
    def partition(self, proposal: Proposal, specs: list[TensorSpec], desc: Any,
                  topology: Topology) -> Partition:
        """Per-device placements and bytes, or a failed partition naming the missing bytes."""
