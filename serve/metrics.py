"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

disable_created_metrics()  # no *_created series: counters and histograms only

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Request counts by route and status, latency histograms, batch sizes, index state gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("silvertorch_requests_total", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("silvertorch_request_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("silvertorch_batch_size", "queries per forward pass",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("silvertorch_batch_seconds", "time of one batched forward pass",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.updates = Counter("silvertorch_item_updates_total", "applied item updates by operation",
                               ["op"], registry=r)
        self.generation = Gauge("silvertorch_index_generation", "index generation being served",
                                registry=r)
        self.items = Gauge("silvertorch_items", "live items in the index", registry=r)
        self.fresh = Gauge("silvertorch_fresh_items", "items in the fresh segment", registry=r)
        self.tombstones = Gauge("silvertorch_tombstones", "deleted items not yet compacted", registry=r)
        self.compactions = Counter("silvertorch_compactions_total", "finished compactions", registry=r)
        self.swaps = Counter("silvertorch_artifact_swaps_total", "hot swaps by result", ["result"],
                             registry=r)

    def set_index(self, stats: dict[str, int]) -> None:
        """Gauges from :meth:`serve.engine.Engine.stats`."""
        self.generation.set(stats.get("generation", 0))
        self.items.set(stats.get("live_items", 0))
        self.fresh.set(stats.get("fresh_items", 0))
        self.tombstones.set(stats.get("tombstones", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
