"""Eligibility benchmark (run as a script; smoke-tested by tests/test_bench_eligibility.py).

    .venv/bin/python -m benchmarks.eligibility_bench --items 1000000 --queries 256
    .venv/bin/python -m benchmarks.eligibility_bench --fpr --items 100000

Catalog: language (40 values), country (200), category (30, 1-3 per item), creator (200k), plus
``tags`` (5,000 values, 0-10 per item) for the FPR table. Queries are
``language:L AND (country:A OR country:B) AND NOT category:C AND creator:creator_X``, a different
L, A, B, C, X per row. "probe" evaluates only 16 of 1,024 clusters' words per row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.eligibility import EligibilityConfig, EligibilityIndex

LANGS = ["en", "es", "de", "fr", "pt", "ja", "it", "ru"] + [f"l{i}" for i in range(32)]
COUNTRIES = ["us", "gb", "de", "fr", "br", "in", "jp", "ca"] + [f"c{i}" for i in range(192)]
CATEGORIES = ["news", "sports", "music", "film", "games"] + [f"cat{i}" for i in range(25)]


def _zipf(n: int, card: int, g: torch.Generator) -> torch.Tensor:
    w = 1.0 / torch.arange(1, card + 1, dtype=torch.float64)
    return torch.multinomial(w, n, replacement=True, generator=g)


def _multi(name: str, n: int, card: int, lo: int, hi: int, g: torch.Generator, vocab=None) -> Attribute:
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    values = _zipf(int(offsets[-1]), card, g)
    return Attribute(name, offsets, values, card, vocab)


def synthetic_catalog(n: int, seed: int = 0, tags: bool = False) -> ItemAttributes:
    g = torch.Generator().manual_seed(seed)
    feats = {
        "language": Attribute.from_single("language", _zipf(n, len(LANGS), g), len(LANGS), LANGS),
        "country": Attribute.from_single("country", _zipf(n, len(COUNTRIES), g), len(COUNTRIES), COUNTRIES),
        "category": _multi("category", n, len(CATEGORIES), 1, 3, g, CATEGORIES),
        "creator": Attribute.from_single(
            "creator", torch.randint(0, 200_000, (n,), generator=g), 200_000,
            [f"creator_{i}" for i in range(200_000)],
        ),
    }
    if tags:
        feats["tags"] = _multi("tags", n, 5000, 0, 10, g)
    return ItemAttributes(n, feats)


def queries(b: int, seed: int = 1, negate_creator: bool = False) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(b):
        lang = LANGS[int(torch.randint(0, 4, (1,), generator=g))]
        a, c = (COUNTRIES[int(i)] for i in torch.randint(0, 8, (2,), generator=g))
        cat = CATEGORIES[int(torch.randint(0, 5, (1,), generator=g))]
        creator = int(torch.randint(0, 200_000, (1,), generator=g))
        tail = f"NOT creator:creator_{creator}" if negate_creator else f"creator:creator_{creator}"
        out.append(f"language:{lang} AND (country:{a} OR country:{c}) AND NOT category:{cat} AND {tail}")
    return out


def probe_words(b: int, n_words: int, nlist: int = 1024, nprobe: int = 16, seed: int = 2) -> torch.Tensor:
    """(b, W) word indices of nprobe random clusters of nlist equal clusters, -1 padded."""
    g = torch.Generator().manual_seed(seed)
    bounds = torch.linspace(0, n_words, nlist + 1).round().to(torch.int64)
    width = int((bounds[1:] - bounds[:-1]).max())
    clusters = torch.stack([torch.randperm(nlist, generator=g)[:nprobe] for _ in range(b)])
    start, stop = bounds[clusters], bounds[clusters + 1]
    offs = torch.arange(width)
    words = start[..., None] + offs
    words = torch.where(offs < (stop - start)[..., None], words, torch.full_like(words, -1))
    return words.reshape(b, -1)


def timeit(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_speed(n: int, b: int, width: int, hashes: int, repeat: int) -> dict[str, float]:
    attrs = synthetic_catalog(n)
    t0 = time.perf_counter()
    index = EligibilityIndex.build(attrs, EligibilityConfig(bloom_width=width, bloom_hashes=hashes))
    res = {"build_s": time.perf_counter() - t0}
    print(f"items {n}, words {index.num_words}, modes {index.modes}, "
          f"table {index.table.numel() * 8 / 2**20:.1f} MiB, build {res['build_s']:.2f} s")
    words = probe_words(b, index.num_words)
    cand = torch.randint(0, n, (b, 1000))
    for name, texts in [("bloom creator", queries(b)), ("NOT creator", queries(b, negate_creator=True))]:
        res[f"{name}: compile_ms"] = 1e3 * timeit(lambda: index.compile(texts), repeat)
        plan = index.compile(texts)
        res[f"{name}: full_ms"] = 1e3 * timeit(lambda: index.evaluate(plan), repeat)
        res[f"{name}: probe16_ms"] = 1e3 * timeit(lambda: index.evaluate(plan, words), repeat)
        res[f"{name}: verify1000_ms"] = 1e3 * timeit(lambda: index.verify(plan, cand), repeat)
    bloom_only = [f"creator:creator_{i} OR creator:creator_{i + 1}" for i in range(b)]
    plan = index.compile(bloom_only)
    res["bloom-only (2 terms x K rows): full_ms"] = 1e3 * timeit(lambda: index.evaluate(plan), repeat)
    res["probe words per row"] = float((words >= 0).sum(1).float().mean())
    return res


def run_fpr(n: int, widths: list[int], ks: list[int], n_terms: int = 64) -> list[tuple]:
    attrs = synthetic_catalog(n, tags=True)
    rows = []
    for width in widths:
        for k in ks:
            cfg = EligibilityConfig(modes={"tags": "bloom", "creator": "bloom"}, bloom_width=width, bloom_hashes=k)
            index = EligibilityIndex.build(attrs, cfg)
            texts = [f"tags:{v}" for v in range(100, 100 + n_terms)]
            measured = float(index.false_positive_rate(index.compile(texts)).mean())
            rows.append((width, k, measured, index.expected_term_fpr(), index.table.numel() * 8 / 2**20))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--hashes", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fpr", action="store_true", help="print the FPR table instead of timings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fpr:
        print("width  K  measured_fpr  analytical_fpr  table_MiB  (tags: 0-10 of 5000 + creator per item)")
        for w, k, m, e, mib in run_fpr(args.items, [64, 128, 256, 512], [1, 2, 4, 6]):
            print(f"{w:5d} {k:2d}  {m:12.5f}  {e:14.5f}  {mib:9.1f}")
        return
    for key, val in run_speed(args.items, args.queries, args.width, args.hashes, args.repeat).items():
        print(f"{key:45s} {val:10.2f}")


if __name__ == "__main__":
    main()
