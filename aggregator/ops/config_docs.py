"""Generate ``docs/configuration.md`` from the settings dataclasses, so docs cannot drift.

``python -m aggregator.ops.config_docs`` rewrites the file; ``tests/unit/test_deploy.py`` fails when
a field is added to :class:`AggregatorConfig`, :class:`AgentConfig`, :class:`ServeConfig` or
:class:`MonitorConfig` without a description here, when a documented flag is not on its
command line, or when the committed file is not what this module renders.
Imports no torch (the config modules are plain dataclasses).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from aggregator import config as aggregator_config
from aggregator.async_config import DESCRIPTIONS as ASYNC_DESCRIPTIONS
from aggregator.config import AggregatorConfig
from aggregator.ops.monitor_view import MonitorConfig, add_monitor_arguments
from aggregator.site_config import DESCRIPTIONS as SITE_DESCRIPTIONS
from aggregator.strategy_config import DESCRIPTIONS as STRATEGY_DESCRIPTIONS
from edge_agent import config as agent_config
from edge_agent.config import AgentConfig
from edge_agent.serve import ServeConfig, add_serve_arguments

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

_COMMON = {
    "broker": "broker URL, `mqtt://host:port` or `mqtts://host:port` (TLS)",
    "federation": "federation name: the topic namespace `fl/v1/{federation}/`",
    "client_id": "MQTT client id (an agent's id is a topic level: `[A-Za-z0-9_.-]`)",
    "username": "MQTT user name",
    "password": "MQTT password",
    "ca_file": "CA certificate for `mqtts://`",
    "threads": "CPU threads for torch / onnxruntime",
    "connect_timeout": "seconds to wait for the first CONNACK",
    "cert_file": "client certificate (brokers that require one)",
    "key_file": "private key of `cert_file`",
    "mqtt_version": "MQTT protocol version: `5`, `3.1.1`, or `auto` (5, and 3.1.1 when the "
    "broker refuses 5 or does not answer it within 3 s); what degrades under 3.1.1: "
    "docs/brokers.md",
    "max_chunk_bytes": "payloads over this many bytes travel as chunks on `<topic>/chunk/<i>`; "
    "an MQTT 5 broker's Maximum Packet Size may lower it, a 3.1.1 broker cannot (set it "
    "below the broker's limit)",
    "allow_plaintext": "connect over plain `mqtt://` although TLS files (or a password for a "
    "broker on another machine) are set; refused otherwise, since the password would travel "
    "in clear text",
}

DESCRIPTIONS: dict[str, dict[str, str]] = {
    "aggregator": {
        **_COMMON,
        "client_id": "MQTT client id of the aggregator",
        "model": "architecture: `lenet5`, `cnn` (FedAvg-paper CNN), `mlp` (2NN), or the name "
        "of a model plugin (a `fedmq.models` entry point of an installed package, or one named "
        "by `FEDMQ_MODEL_PLUGINS`), installed on the aggregator and on every device "
        "(docs/custom-models.md); its architecture fingerprint goes with every round",
        "input_shape": "one float32 sample: C,H,W (images), C,L (sensor windows) or F (feature "
        "vectors); `lenet5` and `cnn` take C,H,W only",
        "num_classes": "number of classes (classification)",
        "task": "`classification` (cross-entropy; accuracy is reported) or `regression` "
        "(`num_outputs` values; RMSE and MAE are reported)",
        "num_outputs": "values a regression model predicts per sample (e.g. a forecast's horizon)",
        "regression_loss": "training loss of a regression task: `mse` or `mae` (also the "
        "reported test loss)",
        "rounds": "rounds to run; the service exits 0 after the last",
        "min_clients": "agents needed to start a round, and the quorum at its deadline",
        "fraction": "fraction of online agents selected per round",
        "round_timeout": "seconds until a round's deadline (extended below quorum)",
        "local_epochs": "local epochs per round",
        "batch_size": "local mini-batch size",
        "lr": "local SGD learning rate",
        "momentum": "local SGD momentum (restarts every round)",
        "weight_decay": "local SGD weight decay",
        "seed": "seed of the initial model, selection and training",
        "codec": "update codec: `fp32`, `fp16`, `int8`, `topk<bits>:<fraction>`, "
        "`lowrank:<rank>[+int8|+int4]` (see docs/compression.md)",
        "download_codec": "how agents that hold the previous global model download the new "
        "one: a quantized delta on `global/delta` (`int8`, `fp16`, `fp32`; with server-side "
        "error feedback), the full model stays retained on `global/model`; `none`: full "
        "model only",
        "eval_data": "held-out data (.npz, IDX, image folder) evaluated after every round; "
        "for sensor models an .npz of samples already windowed and normalised like the "
        "devices' (`x` (N,C,L) or (N,F), `y` labels or float targets)",
        "metrics_file": "write metrics.json (one entry per round) here",
        "max_update_bytes": "updates larger than this are rejected",
        "signing_key": "Ed25519 private key (PEM) signing every global model, delta, round "
        "announcement and ONNX header; none: unsigned (development only)",
        "max_update_norm": "reject deltas with a larger L2 norm over all tensors (on by "
        "default: about 5× the largest honest norm measured on the demo task, docs/security.md; "
        "the norms are logged at debug level); `inf`: off",
        "max_samples": "reject updates claiming more samples than this; an update may also "
        "claim no more than its device declared in its status",
        "max_weight_share": "cap any one device's weight at this share of a round's total "
        "(the heaviest are lowered, FedAvg otherwise unchanged); 1: no cap",
        "update_burst": "update messages of one client read per round; beyond it and "
        "`update_rate` they are dropped unread (one `rate-limited` receipt per interval)",
        "update_rate": "update messages of one client read per second once its burst is spent",
        "wait_clients_timeout": "seconds to wait for `min_clients` agents before giving up",
        "onnx": "export each new global model to ONNX, verify it and publish it retained on "
        "`global/onnx` (`--no-onnx` to turn off)",
        "state_dir": "save `global_model.fmq` / `global_model.onnx` here every round "
        "(default: the metrics file's directory); when set, also a checkpoint and the open "
        "round's journal, from which a restarted aggregator resumes (docs/resilience.md)",
        "on_starved": "a round below quorum at its deadline: `extend` (same selection plus "
        "newly online agents) or `retry` (fresh selection); accepted updates are kept",
        "max_extensions": "extensions/retries of one starved round before the aggregator "
        "gives up (exit code 3)",
        "run": "run epoch, signed into every model and announcement; agents follow the largest "
        "(a new run supersedes older ones). Unset: the checkpoint's run when resuming "
        "`state_dir`, else a new one (the start time in milliseconds); a value contradicting "
        'the checkpoint\'s is an error (docs/security.md, "Runs")',
        **STRATEGY_DESCRIPTIONS,
        **ASYNC_DESCRIPTIONS,
        **SITE_DESCRIPTIONS,
    },
    "agent": {
        **_COMMON,
        "client_id": "this device's id (required), e.g. `pi-07`",
        "site": "the site this device belongs to (docs/sites.md; `fedmq device add` on a site "
        "broker writes it): it trains the rounds that select its site",
        "data": "the device's own data (required): .npz (x, y), IDX files or an image folder; "
        "with `label_column` or `target_columns` set, CSV/Parquet sensor data: one file, or a "
        "directory whose recent files are re-read at every round",
        "val_fraction": "fraction held out for local validation",
        "max_frame_bytes": "global-model frames larger than this are refused",
        "resend_after_s": "re-send an update when no receipt came after this many seconds "
        "(while connected: a disconnected agent re-sends once, at the reconnect)",
        "delta_wait_s": "a round announced on a model the agent does not hold: seconds to "
        "wait for its global delta before downloading the full model",
        "exit_when_finished": "exit when the federation finishes (`--stay`: keep running)",
        "model_public_key": "pinned Ed25519 public key (PEM): only models and round "
        "announcements signed by it are followed; none: development mode (unsigned accepted)",
        "state_dir": "device state, e.g. the error-feedback residual of top-k codecs "
        '(`""`: `$XDG_STATE_HOME/fedmq/<client_id>`)',
        "warm_up": "import torch before going online (default: at the first round it trains)",
        "max_local_epochs": "refuse (log and skip) a round asking for more local epochs than "
        "this device affords",
        "max_batch_size": "refuse (log and skip) a round asking for a larger mini-batch than "
        "this device affords",
        "columns": "sensor data: the feature columns (a table) or channels (a time series), "
        "comma-separated; default: every column but the label, targets and time (a forecast's "
        "target channel is an input too)",
        "label_column": "sensor data: the class label column (integers >= 0, or text with "
        "`label_names`); a window's label is its last row's",
        "label_names": "sensor data: the text labels in class order (`idle,walk,run`: idle is "
        "class 0)",
        "target_columns": "sensor data: regression target column(s) (a window's targets are its "
        "last row's); with `horizon`, the one channel to forecast",
        "time_column": "sensor data: timestamps (numbers or ISO 8601) the rows are sorted by; "
        "never a feature",
        "window": "sensor data: > 0 makes it a time series cut into windows of this many rows "
        "(samples `(channels, window)`, never across files); 0: each row is a sample",
        "stride": "sensor data: rows between the starts of two windows (0: `window`, no overlap)",
        "horizon": "sensor data: > 0 forecasts the next `horizon` values of the target channel "
        "after each window (regression, `horizon` outputs)",
        "normalize": "sensor data: standardise each feature/channel with the mean and std of "
        "this device's training split, applied alike to its validation split "
        "(`--no-normalize` to turn off)",
        "recent_files": "sensor data in a directory: train each round on its newest N files "
        "(by modification time; 0: all)",
        "recent_max_age_s": "sensor data in a directory: train each round only on files "
        "modified within this many seconds (0: any age)",
        "max_rows": "sensor data: rows read per round at most (newest files first; a single "
        "file over it is refused), bounding the device's memory",
        "slowdown": "testing heterogeneous fleets: train this many times as long (real extra "
        "wall time after each batch; 1: as fast as the machine allows)",
        "min_batch_ms": "testing heterogeneous fleets: emulate a device whose batch takes at "
        "least this many ms (times `slowdown`), so that devices sharing a machine's cores keep "
        "their own speeds while the cores are not all busy (0: the machine's speed)",
        "online": "testing heterogeneous fleets: the fraction of the time the device is "
        "on-line, in random spells (it disconnects and reconnects, keeping its state; 1: "
        "always)",
        "online_spell_s": "mean length of an on-line spell in seconds (off-line spells: "
        "`online_spell_s`·(1 − `online`)/`online`)",
    },
    "inference": {
        **_COMMON,
        "client_id": "the device's id (required), e.g. `pi-07`: the server connects as "
        "`{client_id}-infer` (on a provisioned broker: its own login, `username`) and names "
        "the request/response topics after it",
        "username": "MQTT user name; on a provisioned broker `{client_id}-infer`, never the "
        "device's own login (its training agent's connection)",
        "input_topic": "one request topic (may hold wildcards; all its requests share one "
        "budget) instead of each requester's "
        "`fl/v1/{fed}/infer/{client_id}-infer/request/{requester}` (the requester is its "
        "broker login, bound by the provisioned ACL)",
        "output_topic": "where requests on `input_topic` are answered (set both or neither; "
        "default: `fl/v1/{fed}/infer/{client_id}-infer/response/{requester}`)",
        "model": "ONNX file (or fedmq ONNX frame) served until the federation's model arrives",
        "max_model_bytes": "ONNX frames larger than this are refused",
        "model_public_key": "aggregator's model-signing public key (PEM): only ONNX models it "
        "signed are served (unset: unsigned models are served, with a warning)",
        "max_batch": "samples per request; larger batches are refused from the npz header, "
        "before their data is read",
        "requests_per_s": "each requester's sustained request rate; over budget, the first "
        "refusal of a 10 s period gets an error reply, the rest one log line per period",
        "burst_requests": "requests a requester may send at once",
        "request_bytes_per_s": "each requester's sustained request bytes per second",
        "burst_request_bytes": "request bytes a requester may send at once",
        "max_requesters": "requesters tracked at once; when all are active, newcomers are "
        "refused (an idle requester's entry is reused)",
    },
    "monitor": {
        **_COMMON,
        "password": "MQTT password (visible to `ps` as a flag: prefer the TOML file, "
        "`password_file` or the environment)",
        "password_file": "read the MQTT password from this file (first line)",
    },
}

# Flags that are not simply ``--`` + the key with dashes.
FLAGS = {
    "exit_when_finished": "--stay",
    "warm_up": "--warm-up",
    "onnx": "--onnx`/`--no-onnx",
    "normalize": "--normalize`/`--no-normalize",
}

SECTIONS: list[tuple[str, type[Any], str, str]] = [
    ("aggregator", AggregatorConfig, "FEDMQ_AGGREGATOR_", "fedmq-aggregator"),
    ("agent", AgentConfig, "FEDMQ_AGENT_", "fedmq-agent"),
    ("inference", ServeConfig, "FEDMQ_INFERENCE_", "fedmq-agent serve"),
    ("monitor", MonitorConfig, "FEDMQ_MONITOR_", "fedmq monitor"),
]


# The command line of each section, to check that every flag documented here exists.
ADD_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "aggregator": aggregator_config.add_arguments,
    "agent": agent_config.add_arguments,
    "inference": add_serve_arguments,
    "monitor": add_monitor_arguments,
}


def flag_of(name: str) -> str:
    """The flag column of setting ``name`` (several flags are joined by a backquoted slash)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def missing_flags() -> list[str]:
    """``section.field --flag`` of every documented flag its command does not accept."""
    gaps = []
    for section, cls, _, _ in SECTIONS:
        parser = argparse.ArgumentParser(add_help=False)
        ADD_ARGUMENTS[section](parser)
        accepted = {option for action in parser._actions for option in action.option_strings}
        for f in fields(cls):
            gaps += [
                f"{section}.{f.name} {flag}"
                for flag in flag_of(f.name).split("`/`")
                if flag not in accepted
            ]
    return gaps


def missing_descriptions() -> list[str]:
    """``section.field`` of every setting without a description."""
    return [
        f"{section}.{f.name}"
        for section, cls, _, _ in SECTIONS
        for f in fields(cls)
        if f.name not in DESCRIPTIONS[section]
    ]


def render_markdown() -> str:
    """The whole of ``docs/configuration.md``."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `python -m aggregator.ops.config_docs` from the settings dataclasses; a unit",
        "test fails when this file and the code disagree. Each setting comes from, in rising",
        "priority: its default, the TOML file given by `--config` (the table named below),",
        "the environment variable, and the command-line flag (`_` becomes `-`).",
        "",
        "Every source is checked against the setting's type in the same way; a value that does",
        "not fit stops the program with an error naming the key and where the value came from",
        "(e.g. `environment variable FEDMQ_AGGREGATOR_ROUNDS='ten': expected int`). TOML values",
        "must have the right TOML type (an integer is accepted where a float is expected; a",
        "tuple is an array, `input_shape = [1, 28, 28]`). Environment values are text: numbers",
        "as usual, booleans `true`/`false`/`1`/`0`/`yes`/`no`/`on`/`off` (any case), tuples",
        "comma-separated (`FEDMQ_AGGREGATOR_INPUT_SHAPE=1,28,28`), and an empty value sets an",
        "optional setting to none (`FEDMQ_AGGREGATOR_MAX_UPDATE_NORM=` turns the bound off).",
        "",
    ]
    for section, cls, env, command in SECTIONS:
        out += [f"## `[{section}]` — `{command}`", ""]
        out += ["| key | flag | environment | default | meaning |", "|---|---|---|---|---|"]
        for f in fields(cls):
            default = "required" if f.default is MISSING else _show(f.default)
            flag = flag_of(f.name)
            desc = DESCRIPTIONS[section].get(f.name, "")
            out.append(f"| `{f.name}` | `{flag}` | `{env}{f.name.upper()}` | {default} | {desc} |")
        out.append("")
    return "\n".join(out)


def _show(value: object) -> str:
    if value is None:
        return "none"
    if value == "":
        return '`""`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`" + ",".join(map(str, value)) + "`"
    return f"`{value}`"


if __name__ == "__main__":
    gaps = missing_descriptions()
    if gaps:
        sys.exit(f"settings without a description: {', '.join(gaps)}")
    DOC_PATH.parent.mkdir(exist_ok=True)
    DOC_PATH.write_text(render_markdown())
    print(f"wrote {DOC_PATH}")
