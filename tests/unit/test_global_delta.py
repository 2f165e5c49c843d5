"""Global deltas (shared/protocol/global_delta.py) and what the aggregator publishes."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from aggregator.downloads import GlobalDownloads, bytes_down
from shared.protocol.claims import sign_model_v2, verify_model_v2
from shared.protocol.frames import FrameError, decode_frame, tensors_hash
from shared.protocol.global_delta import (
    DeltaError,
    ServerStep,
    apply_delta,
    delta_frame,
    server_step,
    step_rng,
)
from shared.protocol.messages import GlobalMeta, ModelSpec, decode
from shared.protocol.signing import SignatureError, generate_keypair, sign_model, verify_model
from shared.protocol.topics import Topics

FED = "lab"
SHAPES = {"0.weight": (6, 1, 5, 5), "0.bias": (6,), "3.weight": (10, 150), "3.bias": (10,)}


def _model(seed: int = 0, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, scale, s).astype(np.float32) for n, s in SHAPES.items()}


def _step(model: dict[str, np.ndarray], seed: int, scale: float = 1e-3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (v + rng.laplace(0, scale, v.shape)).astype(np.float32) for n, v in model.items()}


def _frame(step: ServerStep, base_hash: str = "b" * 64, signature: str = "") -> bytes:
    return delta_frame(step, federation=FED, base_hash=base_hash, base_round=0, signature=signature)


# --- apply_delta ---------------------------------------------------------------------------
def test_aggregator_and_agent_hold_bit_identical_models() -> None:
    old = _model()
    target = _step(old, 1)
    step = server_step(old, target, None, codec="int8", seed=3, round_id=1)
    payload = _frame(step)

    # The agent: a separate copy of the old model (as decoded from its own frame), the delta
    # frame off the wire, the same function.
    agent_old = {n: np.array(v, copy=True) for n, v in old.items()}
    agent_new = apply_delta(agent_old, decode_frame(payload).tensors)

    assert tensors_hash(agent_new) == step.model_hash == tensors_hash(step.published)
    assert all(np.array_equal(agent_new[n], step.published[n]) for n in SHAPES)
    assert all(agent_new[n].dtype == np.float32 for n in SHAPES)


def test_frame_header_names_round_base_hash_run_and_both_signatures() -> None:
    old = _model()
    step = server_step(old, _step(old, 1), None, codec="int8", seed=0, round_id=5)
    key = generate_keypair()
    sig = sign_model(key, FED, 5, step.model_hash)
    sig2 = sign_model_v2(key, FED, 42, 5, step.model_hash)

    payload = delta_frame(
        step,
        federation=FED,
        base_hash="c" * 64,
        base_round=0,
        signature=sig,
        run=42,
        signature_v2=sig2,
    )
    head = decode_frame(payload).header

    assert (head.kind, head.federation, head.round, head.codec) == ("global_delta", FED, 5, "int8")
    assert head.base_hash == "c" * 64
    assert head.meta == {
        "model_hash": step.model_hash,
        "base_round": 0,
        "signature": sig,
        "run": 42,
        "signature_v2": sig2,
    }
    verify_model(key.public_key(), FED, 5, step.model_hash, head.meta["signature"])
    verify_model_v2(key.public_key(), FED, 42, 5, step.model_hash, head.meta["signature_v2"])


@pytest.mark.parametrize(
    ("q", "reason"),
    [
        ({"0.weight": np.zeros((6, 1, 5, 5), np.float32)}, "missing"),
        (
            {**{n: np.zeros(s, np.float32) for n, s in SHAPES.items()}, "x": np.zeros(1)},
            "unexpected",
        ),
        (
            {**{n: np.zeros(s, np.float32) for n, s in SHAPES.items()}, "0.bias": np.zeros(7)},
            "shape",
        ),
        (
            {
                **{n: np.zeros(s, np.float32) for n, s in SHAPES.items()},
                "0.bias": np.full(6, np.nan),
            },
            "non-finite",
        ),
        (
            {**{n: np.zeros(s, np.float32) for n, s in SHAPES.items()}, "0.bias": np.full(6, 3e38)},
            "overflows",
        ),
    ],
    ids=["missing-tensor", "extra-tensor", "wrong-shape", "nan", "overflow"],
)
def test_apply_delta_refuses_mismatched_or_non_finite_steps(q: dict[str, Any], reason: str) -> None:
    base = _model()
    base["0.bias"] = np.full(6, 3e38, np.float32)

    with pytest.raises(DeltaError, match=reason):
        apply_delta(base, q)


# --- the server step -----------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["int8", "fp16", "fp32"])
def test_error_feedback_invariant_published_plus_residual_is_target_plus_residual(
    codec: str,
) -> None:
    old, residual = _model(), None
    for r in range(1, 4):
        target = _step(old, r)
        step = server_step(old, target, residual, codec=codec, seed=1, round_id=r)
        for n in SHAPES:
            before = target[n].astype(np.float64) + (0 if residual is None else residual[n])
            after = step.published[n].astype(np.float64) + step.residual[n]
            np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
        old, residual = step.published, step.residual
    if codec == "fp32":
        assert max(float(np.abs(v).max()) for v in residual.values()) < 1e-7  # type: ignore[union-attr]


def test_error_feedback_sends_later_what_one_round_dropped() -> None:
    old = _model()
    exact, residual, published = old, None, old
    for r in range(1, 11):
        target = _step(published, r)
        exact = {n: exact[n] + (target[n] - published[n]) for n in SHAPES}
        step = server_step(published, target, residual, codec="int8", seed=0, round_id=r)
        published, residual = step.published, step.residual
    # The published model stays within one quantization step of the exact trajectory.
    drift = max(float(np.abs(published[n] - exact[n]).max()) for n in SHAPES)
    assert residual is not None
    assert drift <= 1.01 * max(float(np.abs(v).max()) for v in residual.values()) + 1e-6


def test_the_step_is_deterministic_per_seed_and_round() -> None:
    old = _model()
    target = _step(old, 1)
    a = server_step(old, target, None, codec="int8", seed=4, round_id=2)
    b = server_step(old, target, None, codec="int8", seed=4, round_id=2)
    c = server_step(old, target, None, codec="int8", seed=4, round_id=3)

    assert a.model_hash == b.model_hash and _frame(a) == _frame(b)
    assert c.model_hash != a.model_hash  # another round: another rounding stream
    assert step_rng(4, 2).random() == step_rng(4, 2).random()


def _five_rounds(codec: str) -> list[tuple[str, str, str]]:
    """(published hash, residual hash, delta-frame digest) of five rounds with a residual."""
    rng = np.random.default_rng(11)
    old, residual, out = _model(), None, []
    for r in range(1, 6):
        # float64 targets: the cast to fp32 inside the step is pinned too.
        target = {n: v + rng.laplace(0, 1e-3, v.shape) for n, v in old.items()}
        step = server_step(old, target, residual, codec=codec, seed=9, round_id=r)
        digest = hashlib.sha256(_frame(step)).hexdigest()
        out.append((step.model_hash[:16], tensors_hash(step.residual)[:16], digest[:16]))
        old, residual = step.published, step.residual
    return out


# Computed with server_step / delta_frame as they were before the step used ErrorFeedback and
# was encoded only once (commit af4a3d9): the demo's published models must not change. The
# frame digests (third column) were re-pinned when the header gained the run and signature_v2;
# the models and residuals (first two) are the same.
PINNED_ROUNDS: dict[str, list[tuple[str, str, str]]] = {
    "int8": [
        ("c8d6f39e764dd2e9", "2ad6d959ec6a1b66", "b1f48f4dcf7e12e0"),
        ("43a41341622e75e7", "c104a290799817e8", "e8664b5e5a15e7ca"),
        ("6a6975a3918284cd", "82edd5a6cba4f10c", "7c6cb63c20742dcf"),
        ("428532d2ffa2e0ae", "9f9c295705e2bd98", "75172c42787fd5a6"),
        ("6fc738a32b07e825", "e20e8e5bdceff0c2", "161fbe1063e0d789"),
    ],
    "fp16": [
        ("f78cd83984e3cbe7", "430524d9a7079d87", "6d82711feba133df"),
        ("f0f4c26e203e934a", "9852016b68f6a6d8", "7712094d38b7488e"),
        ("4cf4e144d118ce05", "eb5971d91d683ea4", "1750bbd74a0a914a"),
        ("d4e9f45a229ea682", "c44740165f20d7c9", "4bb5570e70ff9805"),
        ("b8c837497d96884e", "19e702ec745bd750", "c4f11ab8ae88d66a"),
    ],
    "fp32": [
        ("2530b01293bf3949", "9d1e9fa06e76fe20", "9c9b233b88e4d663"),
        ("78b3bef4132dc538", "9d1e9fa06e76fe20", "16861549e470e043"),
        ("bfd32453100ce214", "9d1e9fa06e76fe20", "7adcd1be37f67d93"),
        ("9323d6a6350f3dfd", "9d1e9fa06e76fe20", "37a00e1b8cc40a10"),
        ("ea312fe99277fe52", "9d1e9fa06e76fe20", "1f525c87249f6e9f"),
    ],
}


@pytest.mark.parametrize("codec", ["int8", "fp16", "fp32"])
def test_server_steps_with_a_residual_publish_the_same_models_as_before(codec: str) -> None:
    assert _five_rounds(codec) == PINNED_ROUNDS[codec]


LENET = {
    "0.weight": (6, 1, 5, 5), "0.bias": (6,), "3.weight": (16, 6, 5, 5), "3.bias": (16,),
    "7.weight": (120, 400), "7.bias": (120,), "9.weight": (84, 120), "9.bias": (84,),
    "11.weight": (10, 84), "11.bias": (10,),
}  # fmt: skip


def test_int8_delta_of_a_lenet_step_is_about_four_times_smaller_than_the_full_model() -> None:
    from aggregator.downloads import model_frame

    rng = np.random.default_rng(0)
    old = {n: rng.uniform(-0.1, 0.1, s).astype(np.float32) for n, s in LENET.items()}
    target = {n: (v + rng.laplace(0, 1e-3, v.shape)).astype(np.float32) for n, v in old.items()}
    step = server_step(old, target, None, codec="int8", seed=0, round_id=1)
    full = model_frame(FED, 1, ModelSpec(arch="lenet5"), step.published)

    # Laplace steps give ≈ 4.1× (Gaussian ones ≈ 3.8×); real FedAvg steps of LeNet ≈ 5.8×.
    assert len(full) > 3.9 * len(_frame(step))


def test_a_frame_that_does_not_reproduce_the_model_is_withheld() -> None:
    old = _model()
    step = server_step(old, _step(old, 1), None, codec="int8", seed=0, round_id=1)
    wrong = ServerStep(**{**step.__dict__, "model_hash": "e" * 64})

    with pytest.raises(DeltaError, match="gives model"):
        _frame(wrong)


@pytest.mark.parametrize(
    ("target", "residual", "reason"),
    [
        ({"0.bias": np.zeros(6, np.float32)}, None, "target tensors do not match"),
        (None, {n: np.zeros(1, np.float32) for n in SHAPES}, "residual tensor"),
        ("nan", None, "non-finite"),
    ],
)
def test_server_step_refuses_inconsistent_inputs(target: Any, residual: Any, reason: str) -> None:
    old = _model()
    if target is None:
        target = _step(old, 1)
    elif isinstance(target, str):
        target = {**_step(old, 1), "0.bias": np.full(6, np.nan, np.float32)}

    with pytest.raises(DeltaError, match=reason):
        server_step(old, target, residual, codec="int8", seed=0, round_id=1)


def test_server_step_refuses_codecs_without_a_step() -> None:
    old = _model()
    with pytest.raises(DeltaError, match="download codec"):
        server_step(old, old, None, codec="none", seed=0, round_id=1)
    with pytest.raises(DeltaError, match="download codec"):
        server_step(old, old, None, codec="topk1:0.01", seed=0, round_id=1)


# --- what the aggregator publishes ---------------------------------------------------------
class _Broker:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []
        self.waited: list[str] = []  # topics whose publish waited for the broker's PUBACK

    def __call__(self, topic: str, payload: bytes, retain: bool = False, wait: bool = True) -> None:
        self.sent.append((topic, payload, retain))
        if wait:
            self.waited.append(topic)


T = Topics(FED)


def test_publishes_full_model_then_delta_then_meta_each_round() -> None:
    key = generate_keypair()
    dl = GlobalDownloads(FED, ModelSpec(arch="lenet5"), "int8", 0, key)
    broker = _Broker()
    old = _model()
    dl.publish(0, old, tensors_hash(old), False, broker)  # the initial model: no delta
    published, h = dl.advance(old, tensors_hash(old), 0, _step(old, 1), 1)
    dl.publish(1, published, h, False, broker)
    dl.publish(1, published, h, True, broker)  # the final re-publication

    assert [(t, bool(p)) for t, p, _ in broker.sent] == [
        (T.global_model, True),
        (T.global_delta, False),  # cleared: no stale delta from an earlier run
        (T.global_meta, True),
        (T.global_model, True),
        (T.global_delta, True),
        (T.global_meta, True),
        (T.global_model, True),  # the delta is retained already: not sent again
        (T.global_meta, True),
    ]
    assert all(retain for _, _, retain in broker.sent)
    # One broker round trip per round: the meta's acknowledgement follows the others'.
    assert broker.waited == [T.global_meta] * 3
    delta = decode_frame(broker.sent[4][1])
    model = decode_frame(broker.sent[3][1])
    meta = decode(broker.sent[5][1], GlobalMeta)
    assert delta.header.base_hash == tensors_hash(old) and delta.header.meta["base_round"] == 0
    assert delta.header.meta["model_hash"] == h == meta.model_hash == tensors_hash(model.tensors)
    assert delta.header.meta["signature"] == model.header.meta["signature"] == meta.signature
    assert dl.delta_bytes(1) == len(broker.sent[4][1]) and dl.delta_bytes(2) == 0
    assert dl.residual is not None


def test_model_delta_and_meta_carry_the_run_and_one_run_bound_signature() -> None:
    key = generate_keypair()
    dl = GlobalDownloads(FED, ModelSpec(arch="lenet5"), "int8", 0, key, run=77)
    broker = _Broker()
    old = _model()
    published, h = dl.advance(old, tensors_hash(old), 0, _step(old, 1), 1)
    dl.publish(1, published, h, False, broker)

    model, delta = (decode_frame(broker.sent[i][1]).header.meta for i in (0, 1))
    meta = decode(broker.sent[2][1], GlobalMeta)
    assert model["run"] == delta["run"] == meta.run == 77
    assert model["signature_v2"] == delta["signature_v2"] == meta.signature_v2
    verify_model_v2(key.public_key(), FED, 77, 1, h, meta.signature_v2)
    with pytest.raises(SignatureError):  # another run's claim
        verify_model_v2(key.public_key(), FED, 76, 1, h, meta.signature_v2)


def test_download_codec_none_publishes_the_exact_model_and_no_delta() -> None:
    dl = GlobalDownloads(FED, ModelSpec(arch="lenet5"), "none", 0, None)
    broker = _Broker()
    old = _model()
    target = _step(old, 1)
    published, h = dl.advance(old, tensors_hash(old), 0, target, 1)
    dl.publish(1, published, h, False, broker)

    assert published is target and h == tensors_hash(target)
    assert dl.residual is None and dl.delta_bytes(1) == 0
    # Only the one clearing of whatever an earlier run left on global/delta.
    assert [(t, bool(p)) for t, p, _ in broker.sent] == [
        (T.global_model, True),
        (T.global_delta, False),
        (T.global_meta, True),
    ]


def test_a_step_the_codec_cannot_carry_publishes_the_full_model_only() -> None:
    dl = GlobalDownloads(FED, ModelSpec(arch="lenet5"), "fp16", 0, None)
    old = _model()
    target = {**old, "0.bias": np.full(6, 1e6, np.float32)}  # over the fp16 range

    published, h = dl.advance(old, tensors_hash(old), 0, target, 1)

    assert published is target and h == tensors_hash(target)
    assert dl.delta_bytes(1) == 0 and dl.residual is None


def test_a_delta_that_fails_its_check_is_withheld_and_the_stale_one_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aggregator.downloads as downloads

    dl = GlobalDownloads(FED, ModelSpec(arch="lenet5"), "int8", 0, None)
    broker = _Broker()
    old = _model()
    published, h = dl.advance(old, tensors_hash(old), 0, _step(old, 1), 1)
    dl.publish(1, published, h, False, broker)

    def broken(*_a: Any, **_k: Any) -> bytes:
        raise DeltaError("round 2: the encoded delta gives model aaaa, not bbbb")

    monkeypatch.setattr(downloads, "delta_frame", broken)
    published2, h2 = dl.advance(published, h, 1, _step(published, 2), 2)
    dl.publish(2, published2, h2, False, broker)

    # The quantized path goes on (the full model carries it); no delta for round 2, and
    # round 1's delta no longer sits next to round 2's model.
    assert h2 == tensors_hash(published2) != h and dl.delta_bytes(2) == 0
    assert [(t, bool(p)) for t, p, _ in broker.sent[3:]] == [
        (T.global_model, True),
        (T.global_delta, False),
        (T.global_meta, True),
    ]
    assert tensors_hash(decode_frame(broker.sent[3][1]).tensors) == h2


def test_bytes_down_is_measured_when_agents_report_it() -> None:
    assert bytes_down([40_000, 41_000], model_bytes=228_000, online=5) == 81_000
    # An agent that does not report: one full model.
    assert bytes_down([40_000, None], model_bytes=228_000, online=5) == 268_000
    # Nobody reports (older agents): the old estimate, one full model per online agent.
    assert bytes_down([None, None], model_bytes=228_000, online=5) == 5 * 228_000
    assert bytes_down([], model_bytes=228_000, online=0) == 228_000


def test_frame_error_is_the_base_of_delta_errors() -> None:
    assert issubclass(DeltaError, FrameError)  # agents log and refuse it like any bad frame
