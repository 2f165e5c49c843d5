"""Model plugins (shared/runtime/plugins.py): resolution, declared specs, fingerprints.

Nothing is installed: the entry-point lookup is replaced, or real ``importlib.metadata``
EntryPoint objects name the test module ``tests/plugin_models.py``.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from shared.protocol.messages import ModelSpec
from shared.runtime import plugins
from shared.runtime.models import UnknownModelError, build_model
from shared.runtime.plugins import (
    ENTRY_POINT_GROUP,
    PLUGINS_ENV,
    ModelPlugin,
    PluginError,
    architecture_fingerprint,
    build_from_spec,
    resolve_plugin,
)
from tests.plugin_models import WINDOW_SHAPE

SPEC = ModelSpec(arch="cnn1d", input_shape=WINDOW_SHAPE, num_classes=3)
REAL_LOOKUP = plugins.plugin_entry_points  # before the autouse fixture replaces it


def _installed(monkeypatch: pytest.MonkeyPatch, **named: str) -> None:
    """Pretend installed packages declare these ``fedmq.models`` entry points."""
    points = [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in named.items()]
    monkeypatch.setattr(plugins, "plugin_entry_points", lambda: points)


@pytest.fixture(autouse=True)
def _no_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no plugin installed and none named in the environment."""
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    monkeypatch.setattr(plugins, "plugin_entry_points", list)


# --- resolution ------------------------------------------------------------------------------
def test_an_installed_plugin_builds_the_announced_model(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, cnn1d="tests.plugin_models:cnn1d")

    model = build_from_spec(SPEC)

    assert model(torch.zeros(4, *WINDOW_SHAPE)).shape == (4, 3)


def test_a_real_entry_point_object_resolves_to_the_test_module() -> None:
    # Nothing installed: a real EntryPoint, loaded by importlib.metadata's own machinery.
    point = EntryPoint("cnn1d", "tests.plugin_models:cnn1d", ENTRY_POINT_GROUP)

    plugin = plugins._as_plugin(point.name, point.load(), point.value)

    assert isinstance(plugin, ModelPlugin)
    assert plugin.input_shape == WINDOW_SHAPE
    assert plugin.build(SPEC)(torch.zeros(1, *WINDOW_SHAPE)).shape == (1, 3)


def test_a_bare_build_callable_is_a_plugin_without_a_declared_spec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _installed(monkeypatch, cnn1d="tests.plugin_models:build_cnn1d")

    plugin = resolve_plugin("cnn1d")

    assert plugin.input_shape is None
    assert "tests.plugin_models:build_cnn1d" in plugin.origin


def test_the_environment_names_plugins_and_wins_over_installed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _installed(monkeypatch, cnn1d="tests.plugin_models:cnn1d")
    monkeypatch.setenv(PLUGINS_ENV, "cnn1d=tests.plugin_models:cnn1d_wider, other=x.y:z")

    plugin = resolve_plugin("cnn1d")

    assert plugin.origin == f"tests.plugin_models:cnn1d_wider from {PLUGINS_ENV}"


def test_a_malformed_environment_entry_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGINS_ENV, "cnn1d:tests.plugin_models")

    with pytest.raises(PluginError, match="not name=module:attribute"):
        resolve_plugin("cnn1d")


def test_an_unknown_model_names_the_built_ins_and_the_plugins_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _installed(monkeypatch, cnn1d="tests.plugin_models:cnn1d")

    with pytest.raises(UnknownModelError) as caught:
        build_from_spec(ModelSpec(arch="gru", input_shape=WINDOW_SHAPE))

    assert "lenet5, cnn, mlp" in str(caught.value)
    assert "plugins here: cnn1d" in str(caught.value)
    assert ENTRY_POINT_GROUP in str(caught.value)


def test_a_plugin_claiming_a_built_in_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, mlp="tests.plugin_models:cnn1d")

    with pytest.raises(PluginError, match="'mlp' is built in, and a plugin claims it too"):
        build_from_spec(ModelSpec(arch="mlp", input_shape=(1, 8, 8)))


def test_two_plugins_of_one_name_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    points = [
        EntryPoint("cnn1d", "tests.plugin_models:cnn1d", ENTRY_POINT_GROUP),
        EntryPoint("cnn1d", "tests.plugin_models:cnn1d_wider", ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(plugins, "plugin_entry_points", lambda: points)

    with pytest.raises(PluginError, match="several plugins"):
        resolve_plugin("cnn1d")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tests.no_such_module:build", "failed to load: ModuleNotFoundError"),
        ("tests.plugin_models:not_a_plugin", "is a int, not a ModelPlugin"),
    ],
)
def test_a_plugin_that_cannot_be_loaded_is_named(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    _installed(monkeypatch, cnn1d=value)

    with pytest.raises(PluginError, match=message):
        resolve_plugin("cnn1d")


# --- the declared spec and the built model -----------------------------------------------------
@pytest.mark.parametrize(
    ("value", "spec", "message"),
    [
        (
            "tests.plugin_models:cnn1d",
            ModelSpec(arch="cnn1d", input_shape=(3, 16)),
            r"takes samples of shape \(2, 16\), the federation announces \(3, 16\)",
        ),
        (
            "tests.plugin_models:classifier_only",
            ModelSpec(arch="cnn1d", input_shape=WINDOW_SHAPE, task="regression"),
            "supports classification, not regression",
        ),
        (
            "tests.plugin_models:build_wrong_output",
            SPEC,
            r"outputs \(2, 4\) for a batch of 2, want \(2, 3\)",
        ),
        ("tests.plugin_models:build_failing", SPEC, "failed to build.*RuntimeError: no GPU here"),
    ],
    ids=["input-shape", "task", "outputs", "raises"],
)
def test_a_plugin_that_cannot_build_the_spec_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, value: str, spec: ModelSpec, message: str
) -> None:
    _installed(monkeypatch, cnn1d=value)

    with pytest.raises(PluginError, match=message):
        build_from_spec(spec)


def test_a_regression_spec_builds_a_head_of_its_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, cnn1d="tests.plugin_models:cnn1d")
    spec = ModelSpec(arch="cnn1d", input_shape=WINDOW_SHAPE, task="regression", num_outputs=4)

    assert build_from_spec(spec)(torch.zeros(5, *WINDOW_SHAPE)).shape == (5, 4)


def test_a_built_in_regression_mlp_takes_feature_vectors() -> None:
    spec = ModelSpec(arch="mlp", input_shape=(6,), task="regression", num_outputs=2)

    assert build_from_spec(spec)(torch.zeros(3, 6)).shape == (3, 2)


def test_the_image_cnns_refuse_windows_with_a_hint() -> None:
    with pytest.raises(ValueError, match=r"takes \(C, H, W\) images.*'mlp' or a model plugin"):
        build_from_spec(ModelSpec(arch="lenet5", input_shape=(3, 128)))


def test_a_built_in_model_is_built_as_before_from_the_same_seed() -> None:
    torch.manual_seed(0)
    before = build_model("lenet5", (1, 28, 28), 10).state_dict()
    torch.manual_seed(0)
    now = build_from_spec(ModelSpec(arch="lenet5")).state_dict()

    assert all(torch.equal(before[k], now[k]) for k in before)


# --- fingerprints ----------------------------------------------------------------------------
def test_the_fingerprint_names_the_architecture_not_the_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _installed(monkeypatch, cnn1d="tests.plugin_models:cnn1d")
    a, b = build_from_spec(SPEC), build_from_spec(SPEC)
    with torch.no_grad():
        next(b.parameters()).add_(1.0)

    assert architecture_fingerprint(a) == architecture_fingerprint(b)
    assert len(architecture_fingerprint(a)) == 64


def test_another_version_of_a_plugin_has_another_fingerprint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _installed(monkeypatch, cnn1d="tests.plugin_models:cnn1d")
    first = architecture_fingerprint(build_from_spec(SPEC))
    _installed(monkeypatch, cnn1d="tests.plugin_models:cnn1d_wider")

    assert architecture_fingerprint(build_from_spec(SPEC)) != first


def test_the_fingerprint_covers_dtypes_and_buffers() -> None:
    plain = torch.nn.Sequential(torch.nn.Linear(4, 2))
    normed = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    half = torch.nn.Sequential(torch.nn.Linear(4, 2)).to(torch.float16)

    prints = {architecture_fingerprint(m) for m in (plain, normed, half)}

    assert len(prints) == 3


def test_a_plugin_dist_info_on_the_path_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How a real process sees an installed plugin: a dist-info directory on sys.path.
    dist = tmp_path / "sensor_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sensor-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\ncnn1d = tests.plugin_models:cnn1d\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "plugin_entry_points", REAL_LOOKUP)

    plugin = resolve_plugin("cnn1d")

    assert plugin.origin == "tests.plugin_models:cnn1d from sensor-plugin 1.0"
