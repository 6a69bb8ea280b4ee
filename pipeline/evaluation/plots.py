"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.core.io import atomic_write  # noqa: E402

TEMPERATURE_KEYS = ("logit_scale", "temp", "temperature")


def _save(fig: plt.Figure, path: str) -> str:
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classnames: list[str], path: str) -> str:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class)."""
    n = max(len(classnames), int(labels.max()) + 1, int(predictions.max()) + 1)
    counts = torch.zeros((n, n)).index_put_((labels, predictions), torch.ones(len(labels)), accumulate=True)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1 + 0.45 * n) if n <= 30 else (12, 12))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:  # beyond that the labels are unreadable; the matrix still shows the structure
        names = (classnames + [str(i) for i in range(len(classnames), n)])[:n]
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        for (i, j), rate in zip(torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(), rates.flatten()):
            if rate >= 0.005:
                ax.text(j, i, f"{rate:.2f}", ha="center", va="center", fontsize=7, color="white" if rate > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({len(labels)} images)")
    return _save(fig, path)


def recall_curves(curves: dict[str, list[float]], path: str) -> str:
    """Recall@k against k for each retrieval direction."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for direction, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker=".", label=direction.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def training_curves(metrics_jsonl: str | Path, path: str) -> str | None:
    """Training loss and temperature (logit_scale or temp) against step, from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    temperature = next((k for k in TEMPERATURE_KEYS if any(k in r for r in rows)), None)
    panels = ["loss"] + ([temperature] if temperature else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    return _save(fig, path)
