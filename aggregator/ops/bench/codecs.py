"""``fedmq bench codecs-inprocess``: codec research without a broker.

The federation of ``fedmq bench inprocess`` (same data, partition, validation hold-out, model,
seeds and hyper-parameters), but every client update goes through exactly what an agent does:
error feedback for the biased codecs, top-k and low-rank
(:class:`shared.compression.error_feedback.ErrorFeedback`, one per client), a real update
frame (:func:`shared.protocol.frames.encode_frame`, with the agent's header: a 64-hex base
hash, client id, training meta) and :func:`shared.protocol.frames.decode_frame` on the
aggregator's side before FedAvg. So the bytes it reports are frame bytes as sent over MQTT and
the accuracy is what the distributed run gets (up to training seeds). Codecs run one after
another; prints one line per round and writes a JSON summary with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.ops.bench.inprocess import client_train_config
from aggregator.ops.demo import add_task_arguments, client_indices, load_task_data
from aggregator.strategy import StreamingFedAvg
from shared.compression.error_feedback import ErrorFeedback
from shared.compression.registry import needs_error_feedback
from shared.protocol.frames import FrameHeader, decode_frame, encode_frame, tensors_hash
from shared.runtime.data import train_val_split


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags: the demo's task flags plus the codecs to compare."""
    add_task_arguments(p)
    p.add_argument("--codecs", default="fp32,topk8:0.01", help="comma-separated codec names")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--ef-momentum",
        type=float,
        default=0.0,
        help="DGC momentum correction on the device's error feedback (research)",
    )
    p.add_argument("--out", type=Path, help="write the per-round figures here as JSON")


def run(args: argparse.Namespace) -> int:
    """Run every codec; print per-round lines and a final comparison."""
    import torch

    torch.set_num_threads(args.threads)
    train, test = load_task_data(args)
    splits = [
        train_val_split(train.subset(idx), args.val_fraction, np.random.default_rng(0))
        for idx in client_indices(args, train.y)
    ]
    results: list[dict[str, Any]] = []
    for codec in [c.strip() for c in args.codecs.split(",") if c.strip()]:
        results.append(run_codec(args, codec, splits, test))
        if args.out:
            args.out.write_text(json.dumps({"task": vars_json(args), "runs": results}, indent=1))
    base = next((r for r in results if r["codec"] == "fp32"), None)
    print(f"\n{'codec':<28} {'bytes/update':>12} {'ratio':>8} {'final acc':>9} {'Δ':>7}")
    for r in results:
        ratio = base["bytes_per_update"] / r["bytes_per_update"] if base else float("nan")
        diff = 100 * (r["final_accuracy"] - base["final_accuracy"]) if base else float("nan")
        print(
            f"{r['codec']:<28} {r['bytes_per_update']:>12,.0f} {ratio:>7.1f}× "
            f"{100 * r['final_accuracy']:>8.2f}% {diff:>+7.2f}"
        )
    return 0


def run_codec(args: argparse.Namespace, codec: str, splits: list[Any], test: Any) -> dict[str, Any]:
    """One federation with ``codec``; returns bytes and accuracy per round."""
    import torch

    from shared.runtime.modelio import get_params, set_params, subtract
    from shared.runtime.models import build_model
    from shared.runtime.training import evaluate, train_local

    torch.manual_seed(args.seed)
    model = build_model(args.model, test.input_shape, test.num_classes)
    params = get_params(model)
    feedback = [ErrorFeedback(momentum=args.ef_momentum) for _ in splits]
    biased = needs_error_feedback(codec)
    rows = []
    print(f"--- {codec} (ef momentum {args.ef_momentum})")
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        base_hash = tensors_hash(params)
        acc = StreamingFedAvg({n: v.shape for n, v in params.items()})
        nbytes = []
        for i, (shard, val) in enumerate(splits):
            set_params(model, params)
            cfg = client_train_config(args, r, i)
            res = train_local(model, shard, cfg)
            ev = evaluate(model, val)
            meta = {
                "train_loss": res.train_loss,
                "train_time_s": res.train_time_s,
                "steps": res.steps,
                "val_accuracy": ev.accuracy,
                "val_loss": ev.loss,
                "val_samples": ev.num_samples,
            }
            delta = subtract(get_params(model), params)
            if biased:
                delta = feedback[i].compensate(delta)
            header = FrameHeader(
                kind="update",
                federation="demo",
                round=r,
                client_id=f"agent-{i:02d}",
                base_hash=base_hash,
                codec=codec,
                num_samples=len(shard),
                meta=meta,
            )
            encoded = encode_frame(header, delta, rng=np.random.default_rng(r * 7919 + i))
            if biased:
                feedback[i].update(delta, encoded.sent)
            nbytes.append(len(encoded.payload))
            acc.add(decode_frame(encoded.payload).tensors, len(shard))  # as the aggregator does
        params = acc.apply(params)
        set_params(model, params)
        ev = evaluate(model, test)
        rows.append(
            {
                "round": r,
                "test_accuracy": ev.accuracy,
                "bytes_per_update": float(np.mean(nbytes)),
                "round_time_s": time.perf_counter() - t0,
            }
        )
        print(
            f"{r:>3} acc {100 * ev.accuracy:6.2f}%  bytes/update {np.mean(nbytes):>9,.0f}  "
            f"{rows[-1]['round_time_s']:5.1f}s",
            flush=True,
        )
    return {
        "codec": codec,
        "ef_momentum": args.ef_momentum if biased else 0.0,
        "final_accuracy": rows[-1]["test_accuracy"],
        "bytes_per_update": float(np.mean([x["bytes_per_update"] for x in rows])),
        "rounds": rows,
    }


def vars_json(args: argparse.Namespace) -> dict[str, Any]:
    """The task flags, JSON-safe."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
