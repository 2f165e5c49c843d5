"""Render a run directory's ``metrics.json`` as plots (PNG) and a summary table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-round entries of ``run_dir/metrics.json``."""
    path = run_dir / "metrics.json" if run_dir.is_dir() else run_dir
    data = json.loads(path.read_text())
    rounds = data.get("rounds") if isinstance(data, dict) else None
    if not isinstance(rounds, list):
        raise ValueError(f"{path}: no 'rounds' list")
    return rounds


def plot_metrics(rounds: list[dict[str, Any]], out_png: Path, title: str = "") -> Path:
    """Accuracy and loss per round (and bytes per round) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [r["round"] for r in rounds]
    fig, (ax_acc, ax_loss, ax_bytes) = plt.subplots(1, 3, figsize=(15, 4.2))
    if is_regression(rounds):
        _plot_errors(ax_acc, xs, rounds)
    else:
        _plot_accuracy(ax_acc, xs, rounds)
    loss_name = "cross-entropy"
    if is_regression(rounds):
        loss_name = "training loss (MSE or MAE)"
    for key, label in (("test_loss", "test"), ("train_loss", "agents' training")):
        ys = [r.get(key) for r in rounds]
        if any(y is not None for y in ys):
            ax_loss.plot(xs, ys, "o-", label=label)
    ax_loss.set(xlabel="round", ylabel=loss_name, title="loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_bytes.bar([x - 0.2 for x in xs], [r["bytes_up"] / 1e3 for r in rounds], 0.4, label="up")
    ax_bytes.bar([x + 0.2 for x in xs], [r["bytes_down"] / 1e3 for r in rounds], 0.4, label="down")
    ax_bytes.set(xlabel="round", ylabel="kB per round (all clients)", title="traffic")
    ax_bytes.legend()
    for ax in (ax_acc, ax_loss, ax_bytes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def is_regression(rounds: list[dict[str, Any]]) -> bool:
    """True when the run's rounds are of a regression task (they report errors, not accuracy)."""
    return bool(rounds) and rounds[-1].get("task") == "regression"


def _plot_errors(ax: Any, xs: list[int], rounds: list[dict[str, Any]]) -> None:
    for key, label, style in (
        ("test_rmse", "test RMSE", "o-"),
        ("test_mae", "test MAE", "o-"),
        ("local_val_rmse", "agents' local validation RMSE", "s--"),
    ):
        ys = [r.get(key) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, style, label=label)
    ax.set(xlabel="round", ylabel="error (target units)", title="error")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_accuracy(ax_acc: Any, xs: list[int], rounds: list[dict[str, Any]]) -> None:
    acc = [r.get("test_accuracy") for r in rounds]
    if any(a is not None for a in acc):
        ax_acc.plot(xs, [100 * a if a is not None else None for a in acc], "o-", label="test")
    val = [r.get("local_val_accuracy") for r in rounds]
    if any(v is not None for v in val):
        ax_acc.plot(
            xs,
            [100 * v if v is not None else None for v in val],
            "s--",
            label="agents' local validation (after local training)",
        )
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title="accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline figures of a run: final accuracy, mean round time, bytes per round."""
    last = rounds[-1]
    n_up = [r["bytes_up"] / max(1, r["accepted"]) for r in rounds]
    # bytes_down: what the round's agents report having downloaded (models and deltas).
    n_down = [r["bytes_down"] / max(1, r["accepted"]) for r in rounds]
    quality = (
        {"final_test_rmse": last.get("test_rmse"), "final_test_mae": last.get("test_mae")}
        if is_regression(rounds)
        else {"final_test_accuracy": last.get("test_accuracy")}
    )
    return {
        "rounds": len(rounds),
        **quality,
        "final_test_loss": last.get("test_loss"),
        "mean_round_time_s": statistics.fmean(r["round_time_s"] for r in rounds),
        "mean_slowest_train_s": statistics.fmean(r["slowest_train_s"] for r in rounds),
        "mean_aggregate_latency_ms": statistics.fmean(r["aggregate_latency_ms"] for r in rounds),
        "max_aggregate_latency_ms": max(r["aggregate_latency_ms"] for r in rounds),
        "mean_bytes_up_per_round": statistics.fmean(r["bytes_up"] for r in rounds),
        "mean_bytes_up_per_client_round": statistics.fmean(n_up),
        "mean_bytes_down_per_round": statistics.fmean(r["bytes_down"] for r in rounds),
        "mean_bytes_down_per_client_round": statistics.fmean(n_down),
        "download_codec": last.get("download_codec", ""),
        "codec": last.get("codec", ""),
    }


def _quality_cell(r: dict[str, Any]) -> str:
    if r.get("task") == "regression":
        rmse = r.get("test_rmse")
        return "-" if rmse is None else f"{rmse:.4g}"
    acc = r.get("test_accuracy")
    return "-" if acc is None else f"{100 * acc:.2f}%"


def print_summary(summary: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    """Print the per-round table and the headline figures with rich."""
    from rich.console import Console
    from rich.table import Table

    per_round = Table(title="rounds")
    quality = "test rmse" if is_regression(rounds) else "test acc"
    cols = ("round", "clients", quality, "test loss", "train loss", "up kB", "down kB", "s")
    for col in cols:
        per_round.add_column(col, justify="right")
    for r in rounds:
        loss, train = r.get("test_loss"), r.get("train_loss")
        per_round.add_row(
            str(r["round"]),
            str(r.get("accepted", "")),
            _quality_cell(r),
            "-" if loss is None else f"{loss:.4f}",
            "-" if train is None else f"{train:.4f}",
            f"{r['bytes_up'] / 1e3:.1f}",
            f"{r['bytes_down'] / 1e3:.1f}",
            f"{r['round_time_s']:.2f}",
        )
    headline = Table(title="summary", show_header=False)
    for key, value in summary.items():
        headline.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(per_round)
    console.print(headline)
