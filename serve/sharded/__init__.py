"""Sharded serving across ranks (``docs/sharded_serving.md``): one process per item shard, launched
by torchx / torchrun; the replica's rank 0 (the *leader*) answers HTTP and fans every batch out to
its followers, and every rank runs the same :class:`~silvertorch.distributed.sharded_retrieval.
ShardedRetrievalModel` forward (all-gather of candidates inside).

Modules: ``fanout`` (leader -> followers messages with timeouts and heartbeats), ``leader`` (the
batching owner thread, item updates, compaction and hot swap in the same queue), ``admin`` (every
rank's compaction, snapshots and hot-swap loading, with the vote that keeps the ranks in step),
``catalog`` (every rank's routing and
writes of item updates), ``updates`` (the leader's validation of update requests), ``app`` (the
HTTP routes), ``worker`` (the per-rank entry point, ``python -m serve.sharded.worker``).
"""
