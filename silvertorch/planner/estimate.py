"""The cost model (stage 1): bytes each tensor costs per query, and the latency of a batch.

Model (``docs/planner.md`` has it with the numbers): retrieval is memory-bound, so the time of a
query is the bytes it reads, each divided by the bandwidth of the tier it lives in, plus the dense
math at the device's rate, plus (when items are sharded) the merge of the per-shard top-K'.

- scan:    ``nprobe / nlist * slots * (dim * bytes(dtype) + 4) / shards + k' * dim * bytes(dtype)``
  (vectors + scales of the probed share, and the K' candidates' vectors the OverArch gathers: every
  shard selects, gathers and scores its own top-K', so that part does not shrink with shards)
- scores:  ``nprobe / nlist * slots / shards * 8``  (write + read of one f32 score, top-K' select)
- filter:  ``nprobe / nlist * words / shards * 8 * rows_read``  (probe-then-filter; a bitmap term
  reads 1 row, a Bloom term ``bloom_hashes`` rows)
- ids / verify: ``k' * 8 + nprobe / nlist * words * 8 / shards``, ``k' * features * (8 + 8 *
  values/item)`` CSR reads when verifying (per shard, like the K' gather)
- centroids and every dense weight: read once per *batch* (a GEMM over the batch)
- math:    ``2 * nlist * dim`` (probe) ``+ 2 * probed slots * dim / shards`` (scan) ``+ 2 * params``
  per tower row ``+ 2 * k' * params(OverArch)`` (each shard scores its own K') ``+ 2 * top_n *
  params(reranker)``, at ``device_tflops``
- tables:  ``pooling * dim * 4`` per feature at TorchRec's kernel bandwidth (``kernel_bw_lookup``:
  HBM, UVM-cached or UVM), plus the pooled vector over the link when the table spans ranks
- merge:   the bytes :class:`~silvertorch.distributed.sharded_retrieval.ShardedRetrievalModel`
  sends, from :mod:`silvertorch.distributed.wire`: one all-gather per batch, ``collective latency
  + B * (shards - 1) * k' * candidate_bytes(T) / link`` (``4 * (5 + T)`` B per candidate: score,
  id, global slot, T task logits; no vectors), and with a reranker one all-reduce of the top-n
  vectors, ``collective latency + B * 2 * (shards - 1) / shards * n * 4 * dim / link`` (ring);
  NVLink inside a host, the NIC across hosts

A batch of ``B`` queries takes ``T(B) = overhead + per_batch + B * per_query``; the planner picks the
largest power-of-two ``B <= max_batch`` with ``T(B) <= latency budget``; a group of shards then
serves ``B / T(B)`` queries/s, and the replicas multiply it (capped by the host DRAM bandwidth that
replicas on one host share when they read offloaded tensors).
"""

from __future__ import annotations

from dataclasses import replace

from silvertorch.distributed.wire import candidate_bytes, fetch_bytes
from silvertorch.planner.model_specs import DTYPE_BYTES, ModelDescription
from silvertorch.planner.types import Estimate, Estimator, Partition, TensorSpec, Topology

__all__ = ["CostModel", "table_bandwidth"]


def table_bandwidth(kernel: str, topology: Topology) -> float:
    """Bytes/s of an embedding lookup under TorchRec ``kernel`` (TorchRec's own bandwidth model)."""
    from torchrec.distributed.planner.constants import UVM_CACHING_RATIO, kernel_bw_lookup

    per_ms = kernel_bw_lookup(
        topology.compute_device,
        kernel,
        topology.device_bandwidth_gbps * 1e6,
        topology.host_bandwidth_gbps * 1e6,
        topology.host_to_device_gbps * 1e6,
        UVM_CACHING_RATIO,
    )
    if not per_ms:
        return topology.bandwidth("device")
    return float(per_ms) * 1000.0


class CostModel(Estimator):
    """The documented memory-bandwidth cost model (module docstring)."""

    def annotate(self, specs: list[TensorSpec], desc: ModelDescription) -> list[TensorSpec]:
        frac = min(1.0, desc.nprobe / desc.nlist)
        kp = desc.retrieval.k_prime
        d = desc.dim
        modes = desc.eligibility_modes()
        if desc.attributes and desc.filter_terms:
            per_term = sum(desc.eligibility.bloom_hashes if modes.get(a.name) == "bloom" else 1
                           for a in desc.attributes) / len(desc.attributes)
        else:
            per_term = 0.0
        oa = desc.retrieval.overarch
        cards_vals = {a.name: a.values_per_item for a in desc.attributes}
        cand = self.candidate_bytes_per_query(desc)  # the K'-proportional reads
        per_query = {
            "index.vectors": frac * desc.num_slots * (d * DTYPE_BYTES[desc.index_dtype] + 4)
            + cand["index.vectors"],
            "index.slot_ids": cand["index.slot_ids"] + frac * desc.num_words * 8,
            "eligibility.table": frac * desc.num_words * 8 * desc.filter_terms * per_term,
            "eligibility.csr": cand["eligibility.csr"],
            "eligibility.csc": 0.0,
            # selectivity-aware probing reads one histogram column per filter term, every cluster
            "index.selectivity": (desc.nlist + 1) * desc.filter_terms * 4.0
            if getattr(desc.retrieval, "min_candidates_factor", 0.0) > 0 and desc.filter_terms else 0.0,
            "overarch.embeddings": kp * sum(cards_vals[f] for f in oa.item_features)
            * oa.feature_embedding_dim * 4,
        }
        for tower_name in ("user_tower", "item_tower"):
            for t in getattr(desc.model, tower_name).tables:
                ids = sum(desc.pooling_factors.get(f, 1.0) for f in t.features)
                per_query[f"{tower_name}.{t.name}"] = ids * t.embedding_dim * 4
        per_query["item_tower.mlp"] = 0.0  # the item tower runs on item updates, not queries
        per_query["item_slot"] = 0.0  # id -> slot map: item updates and exclusions
        out = []
        for s in specs:
            if s.kind == "table":
                # the item tower's tables are read by item updates only
                cost = per_query.get(s.name, 0.0) if s.name.startswith("user_tower.") else 0.0
                out.append(replace(s, bytes_per_query=float(cost)))
            elif s.name in per_query:
                out.append(replace(s, bytes_per_query=float(per_query[s.name])))
            elif s.kind == "dense":  # weights: read once per batch
                out.append(replace(s, bytes_per_query=float(s.bytes), per_batch=True))
            else:
                out.append(s)
        return out

    @staticmethod
    def candidate_bytes_per_query(desc: ModelDescription) -> dict[str, float]:
        """The part of each spec's ``bytes_per_query`` that scales with ``k'`` (not with the probed
        slots): every shard reads it in full for its own top-``K'``, so it does not divide by shards."""
        kp = desc.retrieval.k_prime
        n_feat = len(desc.attributes)
        vals = sum(a.values_per_item for a in desc.attributes)
        return {
            "index.vectors": kp * desc.dim * DTYPE_BYTES[desc.index_dtype],
            "index.slot_ids": kp * 8,
            "eligibility.csr": (kp * (n_feat * 8 + vals * 8)) if desc.retrieval.verify else 0.0,
        }

    @staticmethod
    def merge_seconds(desc: ModelDescription, shards: int, link_bw: float, coll_s: float
                      ) -> tuple[float, float]:
        """(per query, per batch) seconds of the sharded merge over a ``link_bw`` B/s link with
        ``coll_s`` latency per collective: the candidates' all-gather, plus the rerank fetch when a
        reranker is enabled. Bytes from :mod:`silvertorch.distributed.wire` (what the code sends)."""
        kp = desc.retrieval.k_prime
        per_query = (shards - 1) * kp * candidate_bytes(len(desc.retrieval.overarch.tasks)) / link_bw
        per_batch = coll_s
        rr = desc.retrieval.reranker
        if rr.enabled:
            n = min(rr.top_n, kp)
            per_query += 2.0 * (shards - 1) / shards * n * fetch_bytes(desc.dim) / link_bw
            per_batch += coll_s
        return per_query, per_batch

    def flops_per_query(self, specs: list[TensorSpec], desc: ModelDescription, shards: int) -> float:
        by_name = {s.name: s for s in specs}
        frac = min(1.0, desc.nprobe / desc.nlist)
        probe = 2.0 * desc.nlist * desc.dim
        scan = 2.0 * frac * desc.num_slots / shards * desc.dim
        towers = 2.0 * (by_name["user_tower.mlp"].bytes / 4)
        overarch = 2.0 * desc.retrieval.k_prime * by_name["overarch.mlp"].bytes / 4
        rerank = 2.0 * desc.retrieval.reranker.top_n * by_name["reranker"].bytes / 4 \
            if "reranker" in by_name else 0.0
        return probe + scan + towers + overarch + rerank

    def estimate(self, partition: Partition, specs: list[TensorSpec], desc: ModelDescription,
                 topology: Topology) -> Estimate:
        shards = partition.proposal.shards
        tiers = {p.name: p.tier for p in partition.placements}
        per_query: dict[str, float] = {}
        per_batch: dict[str, float] = {"overhead": topology.batch_overhead_us * 1e-6}
        host_bytes_per_query = 0.0
        spans_hosts = shards > topology.devices_per_host
        link_bw = (topology.inter_host_gbps if spans_hosts else topology.intra_host_gbps) * 1e9
        coll = (topology.collective_inter_us if spans_hosts else topology.collective_intra_us) * 1e-6
        frac = min(1.0, desc.nprobe / desc.nlist)
        per_shard = self.candidate_bytes_per_query(desc)
        for s in specs:
            tier = tiers.get(s.name, "device")
            if s.bytes_per_query <= 0 or not s.carried(shards):
                continue
            if s.kind == "table":
                kernel = partition.table_kernels.get(s.name, "fused")
                per_query[s.name] = s.bytes_per_query / table_bandwidth(kernel, topology)
                if partition.table_ranks.get(s.name, 1) > 1:  # pooled vector crosses the link
                    per_query[s.name] += s.bytes_per_query / link_bw
                continue
            whole = per_shard.get(s.name, 0.0)  # read in full by every shard (its own K')
            share = (s.bytes_per_query - whole) / shards + whole if s.shardable else s.bytes_per_query
            seconds = share / topology.bandwidth(tier)
            if s.per_batch:
                per_batch[s.name] = seconds
            else:
                per_query[s.name] = seconds
            if tier == "host" and not s.per_batch:
                host_bytes_per_query += share
        per_query["scores"] = frac * desc.num_slots / shards * 8 / topology.bandwidth("device")
        per_query["math"] = self.flops_per_query(specs, desc, shards) / (topology.device_tflops * 1e12)
        if shards > 1:
            merge_s, merge_batch_s = self.merge_seconds(desc, shards, link_bw, coll)
            per_batch["merge"] = merge_batch_s
            per_query["merge"] = merge_s
        q = sum(per_query.values())
        fixed = sum(per_batch.values())

        def latency(b: int) -> float:
            return fixed + b * q

        batch = 0
        b = 1
        while b <= topology.max_batch and latency(b) <= topology.latency_budget_ms * 1e-3:
            batch = b
            b *= 2
        replicas = max(1, topology.world_size // shards)
        if batch == 0:
            return Estimate(batch=0, latency_s=latency(1), throughput_qps=0.0,
                            per_query_s=per_query, per_batch_s=per_batch)
        qps = replicas * batch / latency(batch)
        if host_bytes_per_query > 0:  # replicas of one host share its DRAM bandwidth
            qps = min(qps, topology.hosts * topology.host_bandwidth_gbps * 1e9 / host_bytes_per_query)
        return Estimate(batch=batch, latency_s=latency(batch), throughput_qps=qps,
                        per_query_s=per_query, per_batch_s=per_batch)
