"""``fedmq bench strategies``: the same federation once per strategy, clean and under attack,
over real MQTT.

For each condition (``--attack none,scale:100,…``) and each strategy (``--strategies``): a fresh
Mosquitto, one aggregator process with the strategy's flags, and one agent process per honest
device (the ``fedmq demo`` machinery); under attack the first ``--malicious`` devices run in
one process of malicious agents (:mod:`aggregator.ops.bench.attack_agents`) that train on
their own share of the data like the others and send poisoned, valid frames. Same partition,
seeds and rounds everywhere. From each run's ``metrics.json``: test accuracy per round.
Writes ``strategies.md``, ``strategies.json`` and ``strategies.png`` into ``--out``.

A strategy is a preset name (:data:`PRESETS`) or ``LABEL:key=value,key=value`` with the
aggregator's settings (``fedadam-lr3:strategy=fedadam,server_lr=0.003``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from aggregator.ops.bench.attacks import Attack
from aggregator.ops.demo import (
    FEDERATION,
    _child_env,
    add_mqtt_version_argument,
    add_task_arguments,
    add_tuned_arguments,
    prepare_data,
    start_processes,
    stop_processes,
)
from aggregator.ops.local_broker import LocalBroker
from aggregator.ops.report import load_metrics
from aggregator.ops.strategy_presets import PRESETS, aggregator_flags

DEFAULT_STRATEGIES = (
    "fedavg,default,fedavgm,fedavgm-cosine,fedadam,fedprox,median,trimmed-mean,multi-krum"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags: the demo's task flags (lr 0.05 and its norm bound), strategies, attacks, DP."""
    add_task_arguments(p)
    add_tuned_arguments(p)
    p.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        help=f"comma-separated presets ({', '.join(PRESETS)}) or LABEL:key=value,… "
        "(semicolon-separated when a spec holds commas)",
    )
    p.add_argument(
        "--attack",
        default="none",
        help="conditions, comma-separated: none, sign-flip, scale[:F], noise[:F], label-flip, "
        "alie (default none)",
    )
    p.add_argument("--malicious", type=int, default=2, help="malicious devices under attack")
    p.add_argument("--dp-epsilon", type=float, help="DP-FedAvg with this ε for every run")
    p.add_argument("--dp-clip", type=float, default=1.0, help="DP clipping bound (default 1)")
    p.add_argument("--codec", default="int8", help="update codec of every run (default int8)")
    p.add_argument(
        "--round-timeout",
        type=float,
        default=60.0,
        help="seconds per round (default 60: ~10× a round here; a wrecked model whose "
        "honest devices diverge then ends in minutes, not hours)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per federation")
    p.add_argument("--out", type=Path, help="output directory (default runs/strategies-<time>)")
    add_mqtt_version_argument(p)


def parse_strategy(spec: str) -> tuple[str, dict[str, str]]:
    """(label, aggregator settings) of a preset name or ``LABEL:key=value,…``."""
    label, sep, body = spec.partition(":")
    if not sep:
        if spec not in PRESETS:
            raise ValueError(f"unknown strategy {spec!r}: a preset ({', '.join(PRESETS)}) or "
                             "LABEL:key=value,…")  # fmt: skip
        return spec, dict(PRESETS[spec])
    settings: dict[str, str] = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[a-z_]+", key):
            raise ValueError(f"strategy {label!r}: {item!r} is not key=value")
        settings[key] = value
    return label, settings


def split_strategies(text: str) -> list[str]:
    """Specs separated by ``;`` when one holds ``:``-settings with commas, else by ``,``."""
    sep = ";" if ";" in text or ":" in text else ","
    return [s.strip() for s in text.split(sep) if s.strip()]


def dp_settings(epsilon: float | None, clients: int, clip: float) -> dict[str, str]:
    """DP-FedAvg over every device each round (q = 1, m = the number of devices)."""
    if epsilon is None:
        return {}
    return {"dp_epsilon": f"{epsilon:g}", "dp_expected_clients": str(clients),
            "dp_clip": f"{clip:g}", "clip": "fixed"}  # fmt: skip


def run_strategies(args: argparse.Namespace) -> int:
    """Run every condition × strategy, then write the table and plot; 0 when all finished."""
    strategies = [parse_strategy(s) for s in split_strategies(args.strategies)]
    conditions = [c.strip() for c in args.attack.split(",") if c.strip()]
    attacks = {c: None if c == "none" else Attack.parse(c) for c in conditions}
    out: Path = args.out or Path("runs") / datetime.now().strftime("strategies-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    args.samples_per_client = args.samples_per_client or None
    print(f"preparing {args.dataset}: {args.clients} clients, {args.partition} α={args.alpha}")
    clients, test = prepare_data(args, out / "data")
    rows = []
    for condition, attack in attacks.items():
        for label, settings in strategies:
            settings = {**settings, **dp_settings(args.dp_epsilon, args.clients, args.dp_clip)}
            print(f"--- {label} ({condition}): {args.rounds} rounds ...", flush=True)
            run_dir = out / _slug(condition) / _slug(label)
            row = _run_one(args, settings, attack, clients, test, run_dir)
            row.update(strategy=label, condition=condition, settings=settings)
            rows.append(row)
            print(f"    {summary_line(row)}", flush=True)
    command = "fedmq bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "(see args)"
    result = {"command": command, "task": _task(args), "rows": rows}
    (out / "strategies.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(rows, command, args.rounds)
    (out / "strategies.md").write_text(table)
    plot(
        rows, out / "strategies.png", f"{args.model}, {args.clients} clients, {args.rounds} rounds"
    )
    print(table)
    print(f"written: {out / 'strategies.md'}, strategies.json, strategies.png")
    return 0 if all(r["finished"] for r in rows) else 1


def _run_one(
    args: argparse.Namespace,
    settings: dict[str, str],
    attack: Attack | None,
    clients: list[Path],
    test: Path,
    out: Path,
) -> dict[str, Any]:
    run_args = copy.copy(args)
    run_args.fraction = 1.0
    malicious = list(range(args.malicious)) if attack is not None else []
    honest = [i for i in range(len(clients)) if i not in malicious]
    # Under attack the honest devices are the quorum: a malicious device whose training
    # diverges on a wrecked model skips its round, which must not hold the others.
    quorum = len(honest) if attack is not None else args.clients
    run_args.min_clients = min(int(settings.pop("min_clients", quorum)), quorum)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with LocalBroker(out / "broker") as broker:
        attackers = []
        if attack is not None:  # before the aggregator, like the honest agents
            attackers.append(_start_attackers(args, broker.url, clients, malicious, attack, out))
        aggregator, agents = start_processes(
            run_args, broker.url, clients, test, out, aggregator_flags(settings), honest
        )
        agents += attackers
        try:
            aggregator.wait(args.timeout)
        except subprocess.TimeoutExpired:
            print(f"    no result after {args.timeout:.0f}s, stopping it")
        finally:
            stop_processes([aggregator])
            stop_processes(agents)
    rounds = load_metrics(out) if (out / "metrics.json").exists() else []
    return {
        "finished": aggregator.returncode == 0 and len(rounds) == args.rounds,
        "exit_code": aggregator.returncode,
        "rounds": len(rounds),
        "accuracy_per_round": [r.get("test_accuracy") for r in rounds],
        "rejected_per_round": [r.get("rejected", 0) for r in rounds],
        "clip_bound_per_round": [r.get("clip_bound") for r in rounds],
        "dp_epsilon": rounds[-1].get("dp_epsilon") if rounds else None,
        "bytes_up_per_client_round": (
            sum(int(r.get("update_bytes") or 0) for r in rounds)
            / max(1, sum(int(r["accepted"]) for r in rounds))
        ),
        "wall_time_s": round(time.monotonic() - t0, 1),
    }


def _start_attackers(
    args: argparse.Namespace,
    url: str,
    clients: list[Path],
    malicious: list[int],
    attack: Attack,
    out: Path,
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "aggregator.ops.bench.attack_agents", "--broker", url,
        "--federation", FEDERATION, "--attack", f"{attack.kind}:{attack.factor:g}",
        "--num-clients", str(len(clients)), "--state-dir", str(out / "state" / "malicious"),
        "--val-fraction", str(args.val_fraction), "--mqtt-version", args.mqtt_version,
    ]  # fmt: skip
    for i in malicious:
        cmd += ["--device", f"agent-{i:02d}={clients[i]}"]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / "malicious.log", "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env())


def accuracy_at(row: dict[str, Any], round_no: int) -> float | None:
    """Test accuracy after round ``round_no`` (None: the run did not get there)."""
    accs = row["accuracy_per_round"]
    return accs[round_no - 1] if 0 < round_no <= len(accs) else None


def summary_line(row: dict[str, Any]) -> str:
    """One line: accuracy at rounds 10 and last, and whether it finished."""
    last = len(row["accuracy_per_round"])
    return (
        f"{row['strategy']} ({row['condition']}): round 10 {_pct(accuracy_at(row, 10))}, "
        f"round {last} {_pct(accuracy_at(row, last))}"
        + ("" if row["finished"] else f" (unfinished, exit {row['exit_code']})")
    )


def markdown_table(rows: list[dict[str, Any]], command: str, rounds: int) -> str:
    """Accuracy at round 10 and at the last round, one column pair per condition."""
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    by = {(r["strategy"], r["condition"]): r for r in rows}
    head = ["strategy"]
    for c in conditions:
        head += [f"{c}: round 10", f"{c}: round {rounds}"]
    lines = [
        f"`{command}`",
        "",
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
    ]
    for s in strategies:
        cells = [f"`{s}`"]
        for c in conditions:
            row = by.get((s, c))
            if row is None:
                cells += ["–", "–"]
                continue
            cells += [_pct(accuracy_at(row, 10)), _last_cell(row, rounds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _last_cell(row: dict[str, Any], rounds: int) -> str:
    """Accuracy at the last round, or where and why a federation stopped before it."""
    if row["finished"]:
        return _pct(accuracy_at(row, rounds))
    done = len(row["accuracy_per_round"])
    last = f": {_pct(accuracy_at(row, done))}" if done else ""
    return f"stopped after round {done}{last} (exit {row['exit_code']})"


def plot(rows: list[dict[str, Any]], png: Path, title: str) -> None:
    """Accuracy per round, one column per condition, one line per strategy; the second row
    zooms on the second half of the rounds, down to 8 points below the best accuracy there
    (a collapsed run leaves it at the bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    fig, axes = plt.subplots(2, len(conditions), figsize=(6.5 * len(conditions), 8), squeeze=False)
    for col, condition in enumerate(conditions):
        runs = [r for r in rows if r["condition"] == condition]
        rounds = max((len(r["accuracy_per_round"]) for r in runs), default=1)
        late: list[float] = []
        for r in runs:
            accs = [100 * a if a is not None else None for a in r["accuracy_per_round"]]
            late += [a for a in accs[rounds // 2 :] if a is not None]
            for ax in axes[:, col]:
                ax.plot(range(1, len(accs) + 1), accs, "o-", markersize=3, label=r["strategy"])
        top, zoom = axes[0, col], axes[1, col]
        top.set(xlabel="round", ylabel="test accuracy (%)", title=condition)
        zoom.set(xlabel="round", ylabel="test accuracy (%)", title=f"{condition}: the second half")
        if late:
            zoom.set_xlim(rounds // 2 + 0.5, rounds + 0.5)
            zoom.set_ylim(max(late) - 8, max(late) + 0.5)
        for ax in (top, zoom):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        top.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _task(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "dataset", "model", "clients", "partition", "alpha", "rounds", "samples_per_client",
        "local_epochs", "batch_size", "lr", "momentum", "seed", "codec", "malicious",
    )  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
