"""The last line before publishing (aggregator/model_check.py, Evaluator.unusable) and the
ONNX parity gate: a model that is not finite, or gives non-finite outputs, goes nowhere."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pytest

from aggregator.evaluation import Evaluator
from aggregator.model_check import next_global_model
from aggregator.onnx_export import ExportError, export_verified
from aggregator.strategy import StreamingFedAvg
from shared.protocol.messages import ModelSpec
from tests.synthetic import INPUT_SHAPE, NUM_CLASSES

SPEC = ModelSpec(arch="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)


@pytest.fixture
def evaluator() -> Evaluator:
    return Evaluator(SPEC, None, seed=0, threads=1)


def _huge(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Finite weights of 1e37: every product in the forward pass overflows."""
    return {n: np.full_like(v, 1.0e37) for n, v in params.items()}


def test_a_trained_looking_model_is_usable(evaluator: Evaluator) -> None:
    assert evaluator.unusable(evaluator.initial_params()) is None


def test_a_model_with_a_nan_weight_is_unusable(evaluator: Evaluator) -> None:
    params = evaluator.initial_params()
    params["1.bias"][0] = np.nan

    assert evaluator.unusable(params) == "1.bias has non-finite values"


def test_finite_weights_with_non_finite_outputs_are_unusable(evaluator: Evaluator) -> None:
    reason = evaluator.unusable(_huge(evaluator.initial_params()))

    assert reason == "its outputs on 64 probe samples are not finite"


def test_a_usable_result_is_returned(evaluator: Evaluator) -> None:
    params = evaluator.initial_params()
    acc = StreamingFedAvg({n: v.shape for n, v in params.items()})
    acc.add({n: np.full_like(v, 0.01) for n, v in params.items()}, 10)

    target, why = next_global_model(acc, params, evaluator.unusable, round_id=2)

    assert why == "" and target is not None
    np.testing.assert_allclose(target["1.bias"], params["1.bias"] + 0.01, rtol=1e-6)


def test_a_result_with_unusable_outputs_is_discarded_and_logged(
    evaluator: Evaluator, caplog: pytest.LogCaptureFixture
) -> None:
    params = evaluator.initial_params()
    acc = StreamingFedAvg({n: v.shape for n, v in params.items()})
    acc.add(_huge(params), 10)

    with caplog.at_level(logging.ERROR, logger="fedmq.aggregator"):
        target, why = next_global_model(acc, params, evaluator.unusable, round_id=2)

    assert target is None
    assert why == (
        "result not usable (its outputs on 64 probe samples are not finite): "
        "the global model is unchanged"
    )
    assert caplog.messages == [f"round 2 discarded: {why}"]


def test_a_result_that_overflows_is_discarded_without_probing(evaluator: Evaluator) -> None:
    params = {"w": np.full(3, 3.0e38, np.float32)}
    acc = StreamingFedAvg({"w": (3,)})
    acc.add({"w": np.full(3, 3.0e38, np.float32)}, 10)
    probed: list[object] = []

    target, why = next_global_model(acc, params, probed.append, round_id=5)  # type: ignore[arg-type]

    assert target is None and "overflows fp32" in why
    assert probed == []


def test_capped_weights_are_logged_once_per_round(
    evaluator: Evaluator, caplog: pytest.LogCaptureFixture
) -> None:
    params = evaluator.initial_params()
    acc = StreamingFedAvg({n: v.shape for n, v in params.items()}, max_share=0.5)
    for client, n in (("a", 10), ("b", 10), ("liar", 10**9)):
        acc.add({k: np.zeros_like(v) for k, v in params.items()}, n, client)

    with caplog.at_level(logging.WARNING, logger="fedmq.aggregator"):
        next_global_model(acc, params, evaluator.unusable, round_id=3)

    assert caplog.messages == [
        "round 3: weight of liar capped from 1000000000 to 20 samples (max share 0.5)"
    ]


def test_the_onnx_parity_gate_refuses_a_model_with_nan_outputs(evaluator: Evaluator) -> None:
    params = _huge(evaluator.initial_params())
    batch = np.random.default_rng(0).uniform(0, 1, size=(8, *INPUT_SHAPE)).astype(np.float32)

    with pytest.raises(ExportError, match=r"max \|Δlogit\| nan"):
        export_verified(SPEC, params, federation="fed", round_id=1, batch=batch)
