"""What the sharded forward pass sends between ranks, in bytes: one source for the code and the planner.

:class:`~silvertorch.distributed.sharded_retrieval.ShardedRetrievalModel` runs at most two
collectives per request batch (``docs/sharded_serving.md``, "The merge"):

1. **candidates** (always): an all-gather of every rank's top-``K'`` as ``(B, K', 5 + T) int32``
   words per rank: retrieval score (f32, 1 word), item id (int64, 2 words), global slot (int64,
   2 words, the merge's tie-break) and the ``T`` OverArch task logits (f32, 1 word each) that the
   rank computed for its own candidates. No item vector crosses the wire.
2. **rerank fetch** (only with a reranker): the ``top_n`` winners' stored vectors ``(B, n, D) f32``,
   ``n = min(top_n, K')``, each filled by the rank that owns it (zeros elsewhere) and summed with one
   all-reduce over their int32 bit views (exact bits: every word has exactly one non-zero term).

Plain Python (no torch): :mod:`silvertorch.planner` imports it for its merge cost.
"""

from __future__ import annotations

__all__ = ["HEADER_WORDS", "WORD_BYTES", "candidate_words", "candidate_bytes", "fetch_bytes"]

WORD_BYTES = 4  # the wire format is int32 words (bit views of f32 / int64 values)
HEADER_WORDS = 5  # score (1), id (2), global slot (2)


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value


def candidate_words(num_tasks: int) -> int:
    """int32 words per candidate in the all-gather: ``5 + num_tasks``."""
    return HEADER_WORDS + _positive(num_tasks, "num_tasks")


def candidate_bytes(num_tasks: int) -> int:
    """Bytes per candidate per rank in the all-gather: ``4 * (5 + num_tasks)`` (28 B for 2 tasks)."""
    return WORD_BYTES * candidate_words(num_tasks)


def fetch_bytes(dim: int) -> int:
    """Bytes per reranked candidate in the rerank fetch (one f32 vector): ``4 * dim``."""
    return WORD_BYTES * _positive(dim, "dim")
