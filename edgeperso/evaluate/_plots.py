"""PNG plots of a report. matplotlib is an optional extra (`pip install edgeperso[plots]`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgeperso._errors import UnsupportedError
from edgeperso.evaluate._report import EvalReport


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UnsupportedError(
            "plots need matplotlib: pip install 'edgeperso[plots]' (or pass --no-plots)"
        ) from None
    return plt


def write_plots(report: EvalReport, directory: str | os.PathLike[str]) -> list[Path]:
    """Per-user scatter (global vs personal), sorted per-user gains and the cold-start curve."""
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    metric = report.primary_metric
    users = sorted(report.users, key=lambda r: r.user)
    g = [r.global_metrics[metric] for r in users]
    p = [r.personal_metrics[metric] for r in users]
    sign = -1.0 if metric == "mae" else 1.0
    gains = sorted(sign * (b - a) for a, b in zip(g, p, strict=True))
    paths = []

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(g, p, s=18, c=["tab:red" if r.kept == "global" else "tab:blue" for r in users])
    low, high = min([*g, *p], default=0.0), max([*g, *p], default=1.0)
    ax.plot([low, high], [low, high], color="grey", lw=1, ls="--")
    ax.set(xlabel=f"global {metric}", ylabel=f"personalized {metric}")
    ax.set_title("per user (red: runtime kept global)", fontsize=9)
    paths.append(_save(fig, out / "per_user.png", plt))

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(gains)), gains, color=["tab:red" if v < 0 else "tab:blue" for v in gains])
    ax.axhline(0, color="grey", lw=1)
    ax.set(xlabel="users, sorted", ylabel=f"gain in {metric}")
    paths.append(_save(fig, out / "gain_by_user.png", plt))

    points = [c for c in report.cold_start if c.users > 0]
    if points:
        fig, ax = plt.subplots(figsize=(5, 3))
        ks = [c.k if c.k is not None else max(r.train_rows for r in users) for c in points]
        means = [c.gain_mean for c in points]
        err = [
            [m - c.gain_ci95[0] for m, c in zip(means, points, strict=True)],
            [c.gain_ci95[1] - m for m, c in zip(means, points, strict=True)],
        ]
        ax.errorbar(ks, means, yerr=err, marker="o", capsize=3)
        ax.axhline(0, color="grey", lw=1)
        labels = [str(c.k) if c.k is not None else "all" for c in points]
        ax.set_xticks(ks, labels)
        ax.set(xlabel="training rows per user (k)", ylabel=f"mean gain in {metric} (95% CI)")
        paths.append(_save(fig, out / "cold_start.png", plt))
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
