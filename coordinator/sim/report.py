"""Simulation output: one CSV of every curve point, and a PNG of eval loss against virtual time and
against total local steps, all strategies on one figure."""

from __future__ import annotations

import csv
from pathlib import Path

from coordinator.sim.simulator import SimResult

CSV_COLUMNS = ["strategy", "label", "virtual_time", "updates", "local_steps", "tokens", "eval_loss"]


def write_csv(path: Path, results: dict[str, SimResult]) -> None:
    """``results`` maps a label (e.g. ``"very/dn+dylu"``) to its run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for label, result in results.items():
            for p in result.curve:
                writer.writerow([result.config.strategy, label, f"{p.virtual_time:.3f}", p.updates,
                                 p.local_steps, p.tokens, f"{p.eval_loss:.5f}"])


def plot_png(path: Path, results: dict[str, SimResult], *, title: str) -> bool:
    """Draw the figure; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, result in results.items():
        xs_t = [p.virtual_time for p in result.curve]
        xs_s = [p.local_steps for p in result.curve]
        ys = [p.eval_loss for p in result.curve]
        by_time.plot(xs_t, ys, marker="o", markersize=3, label=label)
        by_steps.plot(xs_s, ys, marker="o", markersize=3, label=label)
    by_time.set_xlabel("virtual wall-clock time (steps of the fastest worker)")
    by_steps.set_xlabel("total local steps (all workers)")
    for ax in (by_time, by_steps):
        ax.set_ylabel("eval loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(4.0, max(p.eval_loss for r in results.values() for p in r.curve)))
    by_time.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
