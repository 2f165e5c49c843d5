"""Unit tests for the model zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.runtime.models import MODEL_NAMES, UnknownModelError, build_model, count_parameters


@pytest.mark.parametrize(
    ("name", "expected"),
    [("lenet5", 61_706), ("cnn", 1_663_370), ("mlp", 199_210)],
)
def test_parameter_count_matches_reference_architecture(name: str, expected: int) -> None:
    model = build_model(name)

    assert count_parameters(model) == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_outputs_one_logit_per_class(name: str) -> None:
    model = build_model(name, num_classes=7)

    out = model(torch.rand(5, 1, 28, 28))

    assert out.shape == (5, 7)
    assert out.dtype == torch.float32


def test_unknown_model_name_error_lists_valid_names() -> None:
    with pytest.raises(UnknownModelError) as excinfo:
        build_model("resnet9000")

    assert all(name in str(excinfo.value) for name in MODEL_NAMES)


def test_unknown_model_error_is_a_value_error() -> None:
    assert issubclass(UnknownModelError, ValueError)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_accepts_colour_32x32_input(name: str) -> None:
    model = build_model(name, input_shape=(3, 32, 32))

    out = model(torch.rand(2, 3, 32, 32))

    assert out.shape == (2, 10)


def test_lenet5_flatten_size_follows_input_shape() -> None:
    model = build_model("lenet5", input_shape=(3, 32, 32))

    # conv(3->6, pad 2) keeps 32 -> pool 16 -> conv 12 -> pool 6: 16*6*6 inputs to fc1.
    first_fc = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert first_fc.in_features == 16 * 6 * 6


def test_input_too_small_for_conv_stack_is_rejected() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_model("lenet5", input_shape=(1, 8, 8))


def test_malformed_input_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", input_shape=(1, 0, 28))


def test_same_seed_builds_identical_weights() -> None:
    torch.manual_seed(3)
    first = build_model("lenet5")
    torch.manual_seed(3)
    second = build_model("lenet5")

    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_exports_to_onnx_with_matching_outputs(name: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build_model(name).eval()
    sample = torch.rand(4, 1, 28, 28)
    target = tmp_path / f"{name}.onnx"

    # The legacy exporter is used because it is ~10x faster than the dynamo one.
    torch.onnx.export(
        model,
        (sample,),
        str(target),
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
        dynamo=False,
    )
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"input": sample.numpy()})

    with torch.no_grad():
        expected = model(sample).numpy()
    np.testing.assert_allclose(onnx_out, expected, rtol=1e-4, atol=1e-5)
