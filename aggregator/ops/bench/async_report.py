"""``fedmq bench async``'s figures, from each run's ``metrics.json`` (pure, no federation).

Time is wall time from the federation's start: the first version's (or round's) metrics entry
was written at ``ts``, ``round_time_s`` after its announcement, so the run started at
``ts − round_time_s`` of that entry; every entry's accuracy is known from its own ``ts``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

Entry = dict[str, Any]


def timeline(entries: list[Entry]) -> list[tuple[float, float | None]]:
    """(seconds since the start, test accuracy) of every applied round or version."""
    if not entries:
        return []
    start = float(entries[0]["ts"]) - float(entries[0].get("round_time_s") or 0.0)
    return [(float(e["ts"]) - start, e.get("test_accuracy")) for e in entries]


def time_to(points: list[tuple[float, float | None]], target: float) -> float | None:
    """When the accuracy first reached ``target`` (None: never)."""
    return next((t for t, acc in points if acc is not None and acc >= target), None)


def accuracy_at(points: list[tuple[float, float | None]], seconds: float) -> float | None:
    """The accuracy of the last model published by ``seconds`` (None: none yet)."""
    known = [acc for t, acc in points if t <= seconds and acc is not None]
    return known[-1] if known else None


def staleness_histogram(entries: list[Entry]) -> dict[int, int]:
    """How many applied updates were s versions stale, for each s (async runs)."""
    counts = Counter(int(s) for e in entries for s in e.get("staleness") or [])
    return dict(sorted(counts.items()))


def summarize(mode: str, entries: list[Entry], target: float) -> dict[str, Any]:
    """One run's figures: time to target, accuracy over time, updates, staleness, bytes."""
    points = timeline(entries)
    return {
        "mode": mode,
        "versions": len(entries),
        "wall_time_s": round(points[-1][0], 1) if points else 0.0,
        "time_to_target_s": _round(time_to(points, target)),
        "final_accuracy": points[-1][1] if points else None,
        "timeline": [[round(t, 1), acc] for t, acc in points],
        "updates_applied": sum(int(e.get("accepted") or 0) for e in entries),
        "rejected": sum(int(e.get("rejected") or 0) for e in entries),
        "staleness": staleness_histogram(entries),
        "bytes_up": sum(int(e.get("bytes_up") or 0) for e in entries),
        "bytes_down": sum(int(e.get("bytes_down") or 0) for e in entries),
    }


def compare(sync: dict[str, Any], asyn: dict[str, Any], target: float) -> dict[str, Any]:
    """The issue's two targets: async reaches ``target`` in at most half sync's time, and
    after sync's whole wall time is within 1 point of sync's final accuracy."""
    t_sync, t_async = sync["time_to_target_s"], asyn["time_to_target_s"]
    budget = sync["wall_time_s"]
    acc_sync = sync["final_accuracy"]
    acc_async = accuracy_at([(t, a) for t, a in asyn["timeline"]], budget)
    speedup = t_sync / t_async if t_sync and t_async else None
    gap = None if acc_sync is None or acc_async is None else acc_async - acc_sync
    return {
        "target": target,
        "speedup_to_target": None if speedup is None else round(speedup, 2),
        "half_the_time": speedup is not None and speedup >= 2.0,
        "same_wall_time_s": budget,
        "async_accuracy_at_same_time": acc_async,
        "accuracy_gap_points": None if gap is None else round(100 * gap, 2),
        "within_1_point": gap is not None and gap >= -0.01,
    }


def markdown(result: dict[str, Any]) -> str:
    """The table of both runs and the verdict on the targets."""
    sync, asyn, cmp = result["sync"], result["async"], result["compare"]
    target = f"{100 * cmp['target']:.0f} %"
    lines = [
        f"`{result['command']}`",
        "",
        f"| mode | wall time to {target} | final accuracy | wall time | models published "
        "| updates applied | staleness (s: count) | MB up | MB down |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for run in (sync, asyn):
        stale = ", ".join(f"{s}: {n}" for s, n in run["staleness"].items()) or "–"
        lines.append(
            f"| {run['mode']} | {_secs(run['time_to_target_s'])} | {_pct(run['final_accuracy'])} "
            f"| {run['wall_time_s']:.0f} s | {run['versions']} | {run['updates_applied']} "
            f"| {stale} | {run['bytes_up'] / 1e6:.1f} | {run['bytes_down'] / 1e6:.1f} |"
        )
    speed = cmp["speedup_to_target"]
    lines += [
        "",
        f"- to {target}: async {'in ' + format(1 / speed, '.2f') + '× ' if speed else ''}"
        f"the sync wall time ({'met' if cmp['half_the_time'] else 'not met'}: ≤ 0.5×)",
        f"- after sync's {cmp['same_wall_time_s']:.0f} s: async "
        f"{_pct(cmp['async_accuracy_at_same_time'])} vs sync {_pct(sync['final_accuracy'])} "
        f"({'met' if cmp['within_1_point'] else 'not met'}: within 1 point)",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], png: Path) -> None:
    """Accuracy over wall time (both modes) and the async staleness histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[2, 1])
    for key in ("sync", "async"):
        run = result[key]
        pts = [(t, 100 * a) for t, a in run["timeline"] if a is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", markersize=2.5, label=key)
    ax.axhline(100 * result["compare"]["target"], color="grey", linestyle=":", label="target")
    ax.set(xlabel="wall time (s)", ylabel="test accuracy (%)", title="accuracy over wall time")
    ax.grid(alpha=0.3)
    ax.legend()
    stale = result["async"]["staleness"]
    hist.bar([int(s) for s in stale], list(stale.values()))
    hist.set(xlabel="staleness (versions)", ylabel="updates applied", title="async staleness")
    fig.suptitle(result.get("title", ""))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _secs(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.0f} s"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"
