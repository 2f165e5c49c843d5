"""``fedmq bench inprocess``: the demo's federation run in one process, as a yardstick.

Same dataset, partition, model, seeds and hyper-parameters as ``fedmq demo``, but the clients
train one after another in this process and FedAvg is applied directly — no broker, no codec.
The per-round time it prints is what the distributed demo's round time is compared against.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aggregator.ops.demo import add_task_arguments, client_indices, load_task_data
from aggregator.strategy import StreamingFedAvg
from aggregator.update_bounds import update_l2_norm
from shared.runtime.data import train_val_split

if TYPE_CHECKING:
    from shared.runtime.training import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq bench inprocess``: the demo's task flags, same defaults."""
    add_task_arguments(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2 cores)")
    p.add_argument("--out", type=Path, help="write the per-round figures here as JSON")


def client_train_config(args: argparse.Namespace, round_id: int, client: int) -> TrainConfig:
    """Local SGD settings of ``client`` in ``round_id`` for the in-process benchmarks."""
    from shared.runtime.training import TrainConfig

    return TrainConfig(
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        seed=round_id * 1000 + client,
    )


def run_inprocess(args: argparse.Namespace) -> int:
    """Run and print one line per round: accuracy and wall time."""
    import torch

    from shared.runtime.modelio import get_params, set_params, subtract
    from shared.runtime.models import build_model
    from shared.runtime.training import evaluate, train_local

    torch.set_num_threads(args.threads)
    train, test = load_task_data(args)
    # Exactly the agents' training share: same partition, same validation hold-out.
    shards = [
        train_val_split(train.subset(idx), args.val_fraction, np.random.default_rng(0))[0]
        for idx in client_indices(args, train.y)
    ]
    torch.manual_seed(args.seed)
    model = build_model(args.model, train.input_shape, train.num_classes)
    params = get_params(model)
    rows = []
    # The L2 norms of honest updates: what --max-update-norm must stay above.
    largest: list[float] = []
    print(f"{'round':>5} {'test acc':>9} {'round s':>8} {'max norm':>9}")
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        acc = StreamingFedAvg({n: v.shape for n, v in params.items()})
        norms = []
        for i, shard in enumerate(shards):
            set_params(model, params)
            cfg = client_train_config(args, r, i)
            train_local(model, shard, cfg)
            delta = subtract(get_params(model), params)
            norms.append(update_l2_norm(delta))
            acc.add(delta, len(shard))
        params = acc.apply(params)
        wall = time.perf_counter() - t0
        set_params(model, params)
        ev = evaluate(model, test)
        largest.append(max(norms))
        rows.append(
            {"round": r, "test_accuracy": ev.accuracy, "round_time_s": wall, "max_norm": max(norms)}
        )
        print(f"{r:>5} {100 * ev.accuracy:>8.2f}% {wall:>8.2f} {max(norms):>9.3f}")
    mean = sum(x["round_time_s"] for x in rows) / len(rows)
    print(
        f"mean round time {mean:.2f}s, final test accuracy {100 * rows[-1]['test_accuracy']:.2f}%"
        f", largest honest update norm {max(largest):.3f}"
    )
    if args.out:
        args.out.write_text(json.dumps({"rounds": rows, "mean_round_time_s": mean}, indent=1))
    return 0
