"""``fedmq export``: a saved global model (``global_model.fmq``) to a verified ONNX file."""

from __future__ import annotations

import argparse
from pathlib import Path

from aggregator.onnx_export import ExportError, export_verified, holdout_batch
from shared.files import write_atomic
from shared.protocol.claims import frame_run
from shared.protocol.frames import FrameError, decode_frame
from shared.protocol.messages import ModelSpec
from shared.protocol.onnx_frame import sha256
from shared.runtime.data import load_device_data


def run_export(args: argparse.Namespace) -> int:
    """Export a saved global model to ONNX offline; print what was checked."""
    try:
        frame = decode_frame(Path(args.model_file).read_bytes())
    except (FrameError, OSError) as exc:
        print(f"error: {args.model_file}: {exc}")
        return 1
    if frame.header.kind != "model":
        print(f"error: {args.model_file} holds a {frame.header.kind!r} frame, not a model")
        return 1
    named = frame.header.meta.get("model") or {}
    shape_text = args.input_shape or ",".join(map(str, named.get("input_shape", (1, 28, 28))))
    spec = ModelSpec(
        arch=args.model or named.get("arch", "lenet5"),
        input_shape=tuple(int(p) for p in shape_text.split(",")),
        num_classes=args.num_classes or named.get("num_classes", 10),
        task=named.get("task", "classification"),
        num_outputs=named.get("num_outputs", 1),
    )
    holdout = None
    if args.eval_data:
        holdout = load_device_data(args.eval_data)
    try:
        done = export_verified(
            spec,
            frame.tensors,
            federation=frame.header.federation,
            round_id=frame.header.round,
            batch=holdout_batch(holdout, spec.input_shape),
            run=frame_run(frame.header),
        )
    except (ExportError, RuntimeError, ValueError) as exc:
        print(f"error: export failed: {exc}")
        return 1
    write_atomic(Path(args.out), done.frame if args.frame else done.onnx)
    print(
        f"{args.out}: {spec.arch} round {frame.header.round}, {len(done.onnx)} bytes ONNX, "
        f"exported and verified in {done.export_s * 1000:.0f} ms, "
        f"max |Δoutput| {done.parity.max_abs_diff:.2e} on {done.parity.batch} samples, "
        f"sha256 {sha256(done.onnx)}"
    )
    return 0
