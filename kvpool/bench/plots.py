"""PNG plots of replay results, written beside the `--out` JSON file (X.json gives X-turns.png, X-summary.png).

turns    hit rate and median TTFT over the turn index, one curve per run (a replay, or each configuration of a
         compare), with the first run's infinite-cache bound dashed (the runs send the same turns)
summary  per configuration: input throughput, TTFT p50/p90 and latency p50/p90 as bars
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kvpool.bench.replay import Record  # noqa: E402


def _png_path(out: Path, kind: str) -> Path:
    return out.with_name(f"{out.stem}-{kind}.png")


def _by_turn(records: list[Record]) -> dict[int, list[Record]]:
    turns = defaultdict(list)
    for r in records:
        if r.error is None and r.latency_s is not None:
            turns[r.turn].append(r)
    return dict(sorted(turns.items()))


def plot_turns(runs: dict[str, list[Record]], out: Path) -> Path:
    """Hit rate (cached / prompt tokens of the turn's requests) and median TTFT per turn index."""
    fig, (hit_ax, ttft_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))

    def share(turns: dict[int, list[Record]], field: str) -> list[float]:
        return [sum(getattr(r, field) for r in rs) / max(1, sum(r.prompt_tokens for r in rs)) for rs in turns.values()]

    for name, records in runs.items():
        turns = _by_turn(records)
        hit_ax.plot(list(turns), share(turns, "cached_tokens"), marker=".", label=name)
        ttft_ax.plot(list(turns), [np.median([r.ttft_s for r in rs]) for rs in turns.values()], marker=".",
                     label=name)
    first = _by_turn(next(iter(runs.values()), []))
    hit_ax.plot(list(first), share(first, "bound_tokens"), "k--", zorder=3, label="infinite-cache bound")
    hit_ax.set(ylabel="hit rate", ylim=(0, 1.05))
    hit_ax.legend(fontsize="small")
    ttft_ax.set(xlabel="turn", ylabel="TTFT p50 (s)", ylim=(0, None))
    ttft_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, _png_path(out, "turns"))


def plot_summaries(results: dict[str, dict], out: Path) -> Path:
    """Bars per configuration from `summarize` results; configurations that failed or were skipped are left out."""
    results = {name: r for name, r in results.items() if "error" not in r and "skipped" not in r}
    names = list(results)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 2.4 * len(names)), 4))
    axes[0].bar(x, [results[n]["input_tok_s"] for n in names])
    axes[0].set(title="input throughput", ylabel="tokens/s")
    for ax, (metric, title) in zip(axes[1:], (("ttft", "TTFT"), ("latency", "latency"))):
        for offset, q in ((-0.2, "p50"), (0.2, "p90")):
            ax.bar(x + offset, [results[n][f"{metric}_{q}_s"] for n in names], width=0.4, label=q)
        ax.set(title=title, ylabel="s")
        ax.legend(fontsize="small")
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, ha="right")
    return _save(fig, _png_path(out, "summary"))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
