"""Recall-vs-throughput plot (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_recall_qps"]


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
