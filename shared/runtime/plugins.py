"""Model plugins: architectures of your own, resolved by name from installed packages.

A round announcement names its model (:class:`~shared.protocol.messages.ModelSpec`); the
aggregator and every device build it from that name, either from the built-in zoo
(:mod:`shared.runtime.models`: ``lenet5``, ``cnn``, ``mlp``) or from a *plugin*: a Python entry
point of the group ``fedmq.models`` that an installed package declares. No code ever travels
over MQTT: a device trains only what is installed on it.

The interface, all of it::

    # my_sensors/models.py, in a package installed on the aggregator and on every device
    from torch import nn
    from shared.runtime.plugins import ModelPlugin

    def build(spec):                       # spec: shared.protocol.messages.ModelSpec
        channels, length = spec.input_shape
        return nn.Sequential(
            nn.Conv1d(channels, 16, 5, padding=2), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, spec.output_size),
        )

    plugin = ModelPlugin(build, input_shape=(3, 128))

    # its pyproject.toml
    [project.entry-points."fedmq.models"]
    har-cnn = "my_sensors.models:plugin"

- ``build(spec)`` receives the announced :class:`ModelSpec`: ``arch`` (the name), the
  ``input_shape`` of one sample (1 to 3 dims; samples are float32), the ``task``
  (``classification`` or ``regression``) and ``output_size`` (``num_classes`` logits, or
  ``num_outputs`` regression values). It returns a ``torch.nn.Module`` mapping a float32
  ``(N, *input_shape)`` batch to ``(N, output_size)``. The module must be exportable by
  ``torch.onnx.export`` (no Python control flow on tensor values), so that devices without
  torch serve it (``fedmq-agent serve``). Its initial weights do not matter on devices: they
  load the aggregator's global model. Only floating-point parameters and buffers travel.
- The entry point names either a :class:`ModelPlugin` (which declares the input spec: the
  sample shape it takes, and the tasks it supports) or the ``build`` callable itself (no
  declaration: any shape and task the federation announces). A declared spec that differs
  from the announced one is refused before anything is built, with both named.
- Resolution: :func:`resolve_plugin`. Built-in names are reserved: an entry point named
  ``lenet5``, ``cnn`` or ``mlp`` is refused (:class:`PluginError`) when that name is used,
  rather than silently shadowed or silently ignored; so are two packages providing one name.
- For development and tests, :data:`PLUGINS_ENV` (``FEDMQ_MODEL_PLUGINS``) names plugins
  without packaging: ``name=module:attribute`` pairs separated by commas, importable from
  ``sys.path`` (e.g. ``PYTHONPATH``). They take precedence over installed entry points.

What a plugin mismatch costs is bounded by the *architecture fingerprint*
(:func:`architecture_fingerprint`): announcements carry the aggregator's, and a device whose
own build differs refuses the round instead of training something else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from shared.protocol.messages import TASKS, ModelSpec
from shared.runtime.models import MODEL_NAMES, UnknownModelError, build_model, is_builtin

if TYPE_CHECKING:
    from torch import nn

ENTRY_POINT_GROUP = "fedmq.models"
PLUGINS_ENV = "FEDMQ_MODEL_PLUGINS"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")
_FINGERPRINT_DOMAIN = "fedmq-architecture-v1"


class PluginError(ValueError):
    """A plugin that cannot be used: ambiguous, unloadable, or refusing the announced spec."""


@dataclass(frozen=True)
class ModelPlugin:
    """A model plugin: its ``build`` callable and the input spec it declares.

    ``input_shape``: the one sample shape (float32) the model takes; None = whatever the
    federation announces. ``tasks``: the tasks it can be built for.
    """

    build: Callable[[ModelSpec], nn.Module]
    input_shape: tuple[int, ...] | None = None
    tasks: tuple[str, ...] = TASKS
    origin: str = ""  # where it came from, for messages (set by resolve_plugin)

    def check(self, spec: ModelSpec) -> None:
        """Raise PluginError unless this plugin can build ``spec``."""
        where = f"model plugin {spec.arch!r}{f' ({self.origin})' if self.origin else ''}"
        if self.input_shape is not None and tuple(self.input_shape) != tuple(spec.input_shape):
            raise PluginError(
                f"{where} takes samples of shape {tuple(self.input_shape)}, the federation "
                f"announces {tuple(spec.input_shape)}"
            )
        if spec.task not in self.tasks:
            raise PluginError(f"{where} supports {', '.join(self.tasks)}, not {spec.task}")


def plugin_entry_points() -> list[EntryPoint]:
    """Every ``fedmq.models`` entry point of the installed distributions.

    The one place that asks :mod:`importlib.metadata` (tests replace it).
    """
    return list(entry_points(group=ENTRY_POINT_GROUP))


def env_entry_points(environ: Mapping[str, str] | None = None) -> list[EntryPoint]:
    """The plugins named by ``FEDMQ_MODEL_PLUGINS`` (``name=module:attr,...``)."""
    text = (os.environ if environ is None else environ).get(PLUGINS_ENV, "")
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or ":" not in value:
            raise PluginError(f"{PLUGINS_ENV}: {item!r} is not name=module:attribute")
        found.append(EntryPoint(name.strip(), value.strip(), ENTRY_POINT_GROUP))
    return found


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    source = f"{dist.name} {dist.version}" if dist is not None else PLUGINS_ENV
    return f"{ep.value} from {source}"


def find_entry_point(name: str) -> EntryPoint | None:
    """The entry point providing model ``name`` (None: no plugin has it); PluginError when
    it is a built-in name or ambiguous."""
    from_env = [ep for ep in env_entry_points() if ep.name == name]
    installed = [ep for ep in plugin_entry_points() if ep.name == name]
    candidates = from_env or installed
    if is_builtin(name) and candidates:
        raise PluginError(
            f"model name {name!r} is built in, and a plugin claims it too "
            f"({', '.join(_origin(ep) for ep in candidates)}): rename the plugin"
        )
    if len({ep.value for ep in candidates}) > 1:
        raise PluginError(
            f"model {name!r} is provided by several plugins "
            f"({', '.join(_origin(ep) for ep in candidates)}): uninstall all but one"
        )
    return candidates[0] if candidates else None


def resolve_plugin(name: str) -> ModelPlugin:
    """The plugin providing model ``name``; UnknownModelError when none does."""
    ep = find_entry_point(name)
    if ep is None:
        known = sorted({ep.name for ep in [*env_entry_points(), *plugin_entry_points()]})
        raise UnknownModelError(
            f"unknown model {name!r}: not built in ({', '.join(MODEL_NAMES)}) and no installed "
            f"package provides it as a {ENTRY_POINT_GROUP!r} entry point"
            + (f" (plugins here: {', '.join(known)})" if known else " (no plugins here)")
        )
    if not _NAME.match(name):
        raise PluginError(f"plugin name {name!r} is not a valid model name")
    try:
        target = ep.load()
    except Exception as exc:  # a plugin's import may fail in any way: named, not crashed on
        raise PluginError(
            f"model plugin {name!r} ({_origin(ep)}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    return _as_plugin(name, target, _origin(ep))


def _as_plugin(name: str, target: Any, origin: str) -> ModelPlugin:
    if isinstance(target, ModelPlugin):
        plugin = target
    elif callable(target):
        plugin = ModelPlugin(build=target)
    else:
        raise PluginError(
            f"model plugin {name!r} ({origin}) is a {type(target).__name__}, "
            "not a ModelPlugin or a build(spec) callable"
        )
    return ModelPlugin(plugin.build, plugin.input_shape, tuple(plugin.tasks), origin)


def describe_model(name: str) -> str:
    """Where model ``name`` comes from, for log lines: ``built in`` or the plugin's origin."""
    if is_builtin(name):
        return "built in"
    try:
        ep = find_entry_point(name)
    except PluginError as exc:
        return str(exc)
    return _origin(ep) if ep is not None else "not installed"


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for ``spec``: built in, or from its plugin.

    Plugin models are checked against their declared spec before being built, and once built
    on a zero batch: the output must be ``(N, spec.output_size)``. Raises UnknownModelError
    for a name nothing provides, PluginError for a plugin that cannot build ``spec``.
    """
    if is_builtin(spec.arch) and find_entry_point(spec.arch) is None:
        return build_model(spec.arch, tuple(spec.input_shape), spec.output_size)
    plugin = resolve_plugin(spec.arch)
    plugin.check(spec)
    try:
        model = plugin.build(spec)
    except Exception as exc:  # the plugin's own code: its failure is named, never a crash
        raise PluginError(
            f"model plugin {spec.arch!r} ({plugin.origin}) failed to build {_spec_text(spec)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _check_output(model, spec, plugin.origin)
    return model


def _spec_text(spec: ModelSpec) -> str:
    return f"{spec.task} with input {tuple(spec.input_shape)}, {spec.output_size} outputs"


def _check_output(model: Any, spec: ModelSpec, origin: str) -> None:
    """Refuse a plugin model whose output on a zero batch is not ``(2, output_size)``."""
    import torch

    where = f"model plugin {spec.arch!r} ({origin})"
    if not isinstance(model, torch.nn.Module):
        raise PluginError(f"{where} returned a {type(model).__name__}, not a torch.nn.Module")
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros((2, *spec.input_shape), dtype=torch.float32))
    except Exception as exc:  # a shape the plugin cannot take: named
        raise PluginError(
            f"{where} fails on a batch of {tuple(spec.input_shape)} samples: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.output_size):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PluginError(
            f"{where} outputs {shape} for a batch of 2, want (2, {spec.output_size}) "
            f"({_spec_text(spec)})"
        )


def architecture_fingerprint(model: nn.Module) -> str:
    """Hex SHA-256 over the names, shapes and dtypes of ``model``'s state, in order.

    Two builds with the same fingerprint exchange weights tensor for tensor; any other
    difference (a renamed layer, a wider one, a new buffer) changes it. Values are not
    hashed: the fingerprint names the architecture, the model hash names the weights.
    """
    entries = [
        [name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
        for name, tensor in model.state_dict().items()
    ]
    body = json.dumps([_FINGERPRINT_DOMAIN, entries], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()
