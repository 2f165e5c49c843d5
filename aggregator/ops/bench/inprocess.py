"""``fedmq bench inprocess``: the demo's federation run in one process, as a yardstick.

Same dataset, partition, model, seeds and hyper-parameters as ``fedmq demo``, but the clients
train one after another in this process and the aggregator's own strategy code
(:mod:`aggregator.round_strategy`, the aggregator's strategy flags) is applied directly — no
broker, no codec. The per-round time it prints is what the distributed demo's round time is
compared against. With ``--fraction`` below 1 every client takes part in a round independently
with that probability (Poisson sampling, what the DP accountant assumes), which is how the DP
benchmark simulates 1,000 devices (docs/strategies.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.ops.demo import add_task_arguments, client_indices, load_task_data
from aggregator.round_strategy import RoundStrategy, strategy_settings
from aggregator.strategy import AggregationError
from aggregator.strategy_config import add_strategy_arguments, scheduled_lr
from aggregator.update_bounds import update_l2_norm
from shared.runtime.data import train_val_split

if TYPE_CHECKING:
    from shared.runtime.training import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fedmq bench inprocess``: the demo's task flags, same defaults."""
    add_task_arguments(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2 cores)")
    p.add_argument("--out", type=Path, help="write the per-round figures here as JSON")
    p.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="Poisson sampling: each client takes part in a round with this probability",
    )
    p.add_argument(
        "--max-update-norm",
        type=float,
        help="updates with a larger L2 norm are left out, as the aggregator refuses them "
        "(default the aggregator's, 20)",
    )
    add_strategy_arguments(p)


def strategy_config(args: argparse.Namespace) -> AggregatorConfig:
    """The aggregator settings the strategy flags describe (the rest at their defaults)."""
    fields = set(AggregatorConfig.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    given.pop("momentum", None)  # the local SGD's, already in the task flags
    byzantine = given.get("byzantine", 1)
    given["min_clients"] = 2 * byzantine + 3 if given.get("robust", "").endswith("krum") else 1
    return AggregatorConfig(**given)


def client_train_config(args: argparse.Namespace, round_id: int, client: int) -> TrainConfig:
    """Local SGD settings of ``client`` in ``round_id`` for the in-process benchmarks."""
    from shared.runtime.training import TrainConfig

    return TrainConfig(
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=scheduled_lr(strategy_config(args), round_id),
        momentum=args.momentum,
        seed=round_id * 1000 + client,
        proximal_mu=getattr(args, "proximal_mu", None) or 0.0,
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
    cfg = strategy_config(args)
    strategy = RoundStrategy(
        strategy_settings(cfg), {n: v.shape for n, v in params.items()},
        np.random.default_rng([args.seed, 0xD9]),  # the service seeds it from the OS
    )  # fmt: skip
    sampler = np.random.default_rng([args.seed, 0x5A])
    bound = cfg.max_update_norm or float("inf")
    rows: list[dict[str, Any]] = []
    # The L2 norms of honest updates: what --max-update-norm must stay above.
    largest: list[float] = []
    print(f"{'round':>5} {'test acc':>9} {'round s':>8} {'max norm':>9} {'clients':>7} {'ε':>6}")
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        chosen = [i for i in range(len(shards)) if sampler.random() < args.fraction]
        agg = strategy.open_round(max(len(chosen), 1))
        norms = []
        for i in chosen:
            set_params(model, params)
            cfg_i = client_train_config(args, r, i)
            train_local(model, shards[i], cfg_i)
            delta = subtract(get_params(model), params)
            norms.append(update_l2_norm(delta))
            if norms[-1] <= bound:  # the aggregator refuses the others (over-norm)
                agg.add(delta, len(shards[i]))
        try:
            params = agg.apply(params)
        except AggregationError as exc:  # no client sampled, or not finite: as discarded
            print(f"round {r} discarded: {exc}")
            strategy.close(agg, applied=False)
        else:
            strategy.close(agg, applied=True)
        wall = time.perf_counter() - t0
        set_params(model, params)
        ev = evaluate(model, test)
        largest.append(max(norms, default=0.0))
        eps = strategy.epsilon()
        rows.append(
            {"round": r, "test_accuracy": ev.accuracy, "round_time_s": wall,
             "max_norm": largest[-1], "clients": len(chosen), "clip_bound": agg.bound,
             "dp_epsilon": eps}
        )  # fmt: skip
        print(
            f"{r:>5} {100 * ev.accuracy:>8.2f}% {wall:>8.2f} {largest[-1]:>9.3f} "
            f"{len(chosen):>7} {'-' if eps is None else f'{eps:.2f}':>6}"
        )
    mean = sum(x["round_time_s"] for x in rows) / len(rows)
    print(
        f"mean round time {mean:.2f}s, final test accuracy {100 * rows[-1]['test_accuracy']:.2f}%"
        f", largest honest update norm {max(largest):.3f}"
    )
    if args.out:
        settings = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str)}
        args.out.write_text(
            json.dumps({"rounds": rows, "mean_round_time_s": mean, "args": settings}, indent=1)
        )
    return 0
