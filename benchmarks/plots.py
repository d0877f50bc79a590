"""Benchmark plots (matplotlib, Agg backend: no display needed): recall vs throughput, scaling,
memory per item."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_recall_qps", "plot_ann", "plot_scaling", "plot_memory"]


def plot_recall_qps(result, path: Path) -> Path:
    """One line per system over the nprobe sweep (labelled), exhaustive scans as single points."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    rows = result.search + result.filtered

    def label(r) -> str:
        return f"{r.system} [{r.cls} filters]" if r.cls else r.system

    systems = list(dict.fromkeys(label(r) for r in rows))
    palette = plt.get_cmap("tab20").colors  # one distinct colour per system (up to 20)
    for i, system in enumerate(systems):
        pts = sorted((r for r in rows if label(r) == system), key=lambda r: r.nprobe or 0)
        style = "--" if "faiss" in system else "-"
        marker = "s" if pts[0].nprobe is None else "o"
        line, = ax.plot([r.recall for r in pts], [r.qps for r in pts], style, marker=marker, label=system,
                        color=palette[i % len(palette)])
        for r in pts:
            if r.nprobe is not None:
                ax.annotate(str(r.nprobe), (r.recall, r.qps), textcoords="offset points", xytext=(3, 3),
                            fontsize=7, color=line.get_color())
    ax.axvline(0.95, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{result.config.k} (exact fp32 inner product; filtered: exact among matches)")
    ax.set_ylabel("queries / s (log)")
    c = result.config
    ax.set_title(f"{c.num_items:,} x {c.dim} items, nlist {c.nlist}, batch {c.num_queries:,}, "
                 f"k={c.k} (labels: nprobe)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ann(points, path: Path, k: int, title: str) -> Path:
    """Recall@k vs queries/s, one curve per system (``AnnPoint`` list), labelled by the swept knob."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    palette = plt.get_cmap("tab10").colors
    for i, system in enumerate(dict.fromkeys(p.system for p in points)):
        pts = sorted((p for p in points if p.system == system), key=lambda p: p.value or 0)
        exhaustive = pts[0].value is None
        line, = ax.plot([p.recall for p in pts], [p.qps for p in pts], "--" if "faiss" in system else "-",
                        marker="s" if exhaustive else "o", label=system, color=palette[i % len(palette)])
        for p in pts:
            if p.value is not None:
                ax.annotate(str(p.value), (p.recall, p.qps), textcoords="offset points", xytext=(3, 3),
                            fontsize=7, color=line.get_color())
    ax.axvline(0.95, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{k} (exact fp32 inner product)")
    ax.set_ylabel("queries / s (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    return _save(fig, path)


def plot_scaling(rows, path: Path) -> Path:
    """Two panels: microseconds per query vs catalog size, and vs k; measured and the bandwidth limit."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, sweep, xlabel in ((axes[0], "catalog", "catalog items"), (axes[1], "k", "k (candidates returned)")):
        rs = sorted((r for r in rows if r.sweep == sweep), key=lambda r: r.items if sweep == "catalog" else r.k)
        if not rs:
            ax.set_visible(False)
            continue
        x = [r.items if sweep == "catalog" else r.k for r in rs]
        ax.plot(x, [r.us_per_query for r in rs], "-o", label="SilverTorch int8 IVF (measured)")
        ax.plot(x, [r.limit_us_per_query for r in rs], "--s", label="bandwidth limit (bytes scanned / GB/s)")
        for xi, r in zip(x, rs):
            ax.annotate(f"nprobe {r.nprobe}", (xi, r.us_per_query), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("microseconds / query (log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("cost per query vs catalog size (k fixed)", fontsize=10)
    axes[1].set_title("cost per query vs k (catalog fixed)", fontsize=10)
    return _save(fig, path)


def plot_memory(dtypes, path: Path) -> Path:
    """Stacked bars: bytes per item of each buffer group, one bar per storage dtype."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = list(dtypes[0].groups)
    bottom = [0.0] * len(dtypes)
    for g in groups:
        vals = [d.per_item(g) for d in dtypes]
        ax.bar([d.dtype for d in dtypes], vals, bottom=bottom, label=g)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.0f} B", (i, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bytes per item")
    ax.set_title(f"index bytes per item ({dtypes[0].items:,} items, dim from the catalog)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
