"""Export global models to ONNX, verify them against torch, and publish/save them.

The TorchScript-based exporter (``dynamo=False``) is used: on this class of model (plain
``nn.Sequential`` stacks) it takes ~0.2 s where the dynamo exporter takes ~5 s, and it needs
no onnxscript. Every export is checked with ``onnx.checker`` and run through onnxruntime on a
held-out batch: outputs must agree with torch within :data:`PARITY_TOLERANCE` (and, for a
classifier, give the same argmax), or the model is not published. Plugin models export the
same way, from float32 samples of the announced input shape.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.files import write_atomic
from shared.protocol.claims import sign_onnx_header
from shared.protocol.frames import tensors_hash
from shared.protocol.messages import ModelSpec
from shared.protocol.onnx_frame import OnnxHeader, encode_onnx_frame, sha256
from shared.protocol.topics import Topics
from shared.runtime.data import ArrayDataset
from shared.runtime.modelio import set_params
from shared.runtime.plugins import build_from_spec

log = logging.getLogger("fedmq.onnx")

OPSET = 17
PARITY_TOLERANCE = 1e-4
STATE_MODEL_FILE = "global_model.fmq"
STATE_ONNX_FILE = "global_model.onnx"
Publish = Callable[[str, bytes, bool], None]
Tensors = dict[str, np.ndarray]


class ExportError(RuntimeError):
    """The ONNX export failed its checks (checker or parity with torch)."""


@dataclass(frozen=True)
class Parity:
    """How closely onnxruntime reproduces torch on one batch."""

    max_abs_diff: float
    same_argmax: bool
    batch: int
    max_abs_output: float = 0.0  # the largest |output| of torch on the batch


@dataclass(frozen=True)
class OnnxExport:
    """A verified export: the ONNX bytes, its frame, and what it cost."""

    onnx: bytes
    frame: bytes
    parity: Parity
    export_s: float


def export_onnx(
    model: torch.nn.Module, input_shape: tuple[int, ...], output_name: str = "logits"
) -> bytes:
    """ONNX bytes of ``model`` (eval mode) with a dynamic batch axis named ``batch``.

    The input is named ``input`` (float32 ``(batch, *input_shape)``), the output
    ``output_name`` (``logits`` for a classifier, ``outputs`` for regression).
    """
    model.eval()
    example = torch.zeros((1, *input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            buf,  # type: ignore[arg-type]  # file-like objects are accepted at run time
            dynamo=False,
            input_names=["input"],
            output_names=[output_name],
            dynamic_axes={"input": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
        )
    return buf.getvalue()


def check_onnx(onnx_bytes: bytes) -> None:
    """Run ``onnx.checker`` on the model; raise ExportError when it is not valid."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(onnx_bytes), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"onnx.checker rejected the export: {exc}") from exc


def verify_parity(model: torch.nn.Module, onnx_bytes: bytes, batch: np.ndarray) -> Parity:
    """Compare torch and onnxruntime outputs on ``batch`` (float32 ``(N, *input_shape)``);
    ``same_argmax`` compares the largest output of each sample (a classifier's class)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(batch, dtype=np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    got, want = got.reshape(len(x), -1), want.reshape(len(x), -1)
    with np.errstate(invalid="ignore"):  # inf − inf is NaN, which fails the gate
        diff = float(np.max(np.abs(got - want))) if len(x) else 0.0
    same = bool(np.array_equal(got.argmax(axis=1), want.argmax(axis=1)))
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return Parity(diff, same, len(x), scale)


def holdout_batch(
    data: ArrayDataset | None, input_shape: tuple[int, ...], n: int = 64, seed: int = 0
) -> np.ndarray:
    """The first ``n`` held-out samples, or seeded uniform noise without held-out data."""
    if data is not None and len(data):
        sub = data.subset(np.arange(min(n, len(data))))
        return sub.shaped(tuple(input_shape)).as_float()
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(n, *input_shape)).astype(np.float32)


def export_verified(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    *,
    federation: str,
    round_id: int,
    batch: np.ndarray,
    model: torch.nn.Module | None = None,
    signing_key: Ed25519PrivateKey | None = None,
    run: int = 0,
) -> OnnxExport:
    """Export ``params`` as ONNX, check it, verify parity, and frame it; or raise ExportError."""
    t0 = time.perf_counter()
    model = model or build_from_spec(spec)
    set_params(model, params)
    classifier = spec.task == "classification"
    onnx_bytes = export_onnx(model, spec.input_shape, "logits" if classifier else "outputs")
    check_onnx(onnx_bytes)
    parity = verify_parity(model, onnx_bytes, batch)
    # Regression values may be large (raw sensor units): the bound is relative beyond 1.
    limit = PARITY_TOLERANCE * (1.0 if classifier else max(1.0, parity.max_abs_output))
    # Written so that NaN fails: NaN > limit is false, and so would pass a NaN model.
    if not parity.max_abs_diff <= limit or (classifier and not parity.same_argmax):
        raise ExportError(
            f"onnxruntime disagrees with torch: max |Δ{'logit' if classifier else 'output'}| "
            f"{parity.max_abs_diff:.2e}, "
            f"same argmax: {parity.same_argmax}"
        )
    header = OnnxHeader(
        federation=federation,
        run=run,
        round=round_id,
        model_hash=tensors_hash(params),
        onnx_sha256=sha256(onnx_bytes),
        input_shape=tuple(spec.input_shape),
        num_classes=spec.num_classes,
        arch=spec.arch,
        opset=OPSET,
        task=spec.task,
        num_outputs=spec.num_outputs if spec.task == "regression" else 1,
    )
    # The whole header is signed (input shape, classes, ...), not only the ONNX hash: a
    # device pinning the aggregator's key serves nothing relabelled.
    if signing_key is not None:
        header = sign_onnx_header(signing_key, header)
    frame = encode_onnx_frame(header, onnx_bytes)
    return OnnxExport(onnx_bytes, frame, parity, time.perf_counter() - t0)


class RoundExporter:
    """After each applied round: save the model frame (state dir) and publish its ONNX."""

    def __init__(
        self,
        spec: ModelSpec,
        federation: str,
        *,
        onnx: bool,
        state_dir: Path | None,
        holdout: ArrayDataset | None,
        seed: int = 0,
        signing_key: Ed25519PrivateKey | None = None,
        run: int = 0,
    ) -> None:
        self.spec = spec
        self.signing_key = signing_key
        self.run = run  # the aggregator's run epoch (set again when it resumes a run)
        self.federation = federation
        self.onnx = onnx
        self.state_dir = state_dir
        self.topics = Topics(federation)
        self.batch = holdout_batch(holdout, spec.input_shape, seed=seed)
        self.model = build_from_spec(spec)

    def after_round(
        self, params: Tensors, round_id: int, publish: Publish | None, frame: bytes
    ) -> OnnxExport | None:
        """Save the published model ``frame`` and export ONNX; failures are logged only."""
        if self.state_dir is not None:
            write_atomic(self.state_dir / STATE_MODEL_FILE, frame)
        if not self.onnx:
            return None
        try:
            done = export_verified(
                self.spec,
                params,
                federation=self.federation,
                round_id=round_id,
                batch=self.batch,
                model=self.model,
                signing_key=self.signing_key,
                run=self.run,
            )
        except (ExportError, RuntimeError, ValueError) as exc:
            log.error("round %d: ONNX export failed, not published: %s", round_id, exc)
            return None
        if publish is not None:
            publish(self.topics.global_onnx, done.frame, True)
        if self.state_dir is not None:
            write_atomic(self.state_dir / STATE_ONNX_FILE, done.onnx)
        log.info(
            "round %d: ONNX model %d bytes exported and verified in %.0f ms "
            "(max |Δoutput| %.1e on %d held-out samples)",
            round_id,
            len(done.onnx),
            done.export_s * 1000,
            done.parity.max_abs_diff,
            done.parity.batch,
        )
        return done


def state_dir_of(state_dir: str | None, metrics_file: str | None) -> Path | None:
    """Where the aggregator saves its models: ``--state-dir``, else the metrics file's dir."""
    if state_dir:
        return Path(state_dir)
    return Path(metrics_file).parent if metrics_file else None
