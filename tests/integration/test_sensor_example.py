"""The sensor example of docs/custom-models.md, run as its command runs it (a short version).

Real speaker recordings (JapaneseVowels, bundled with sktime) become per-device CSV
directories split non-IID; a real Mosquitto, a real ``fedmq-aggregator`` and one real
``fedmq-agent`` per device train the example's plugin CNN, resolved from the installed
``fedmq-sensor-cnn`` package's entry point; then the centralised baseline. Skipped without
sktime or the example package (failed under CI=true: deploy/quickstart.sh setup installs both).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runtime.plugins import plugin_entry_points
from tests.conftest import require_mosquitto, running_in_ci
from tests.integration import federation as fed

pytestmark = pytest.mark.integration

EXAMPLE = fed.REPO / "docs" / "examples" / "sensor-cnn"
INSTALL = f"pip install -e '{EXAMPLE.relative_to(fed.REPO)}[data]' (deploy/quickstart.sh setup)"


def require_example() -> None:
    """Skip without sktime or the installed example plugin; fail under CI=true."""
    missing = []
    if importlib.util.find_spec("sktime") is None:
        missing.append("sktime (its bundled JapaneseVowels files are the data)")
    if "vowels-cnn" not in {ep.name for ep in plugin_entry_points()}:
        missing.append("the fedmq-sensor-cnn package (its fedmq.models entry points)")
    if not missing:
        return
    reason = f"the sensor example needs {' and '.join(missing)}: {INSTALL}"
    if running_in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def test_the_sensor_example_federates_speaker_recordings_and_learns(tmp_path: Path) -> None:
    require_mosquitto()
    require_example()
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sensor_cnn.run", "--devices", "3", "--rounds", "3"]
    cmd += ["--local-epochs", "2", "--out", str(out)]
    env = fed._env(tmp_path, {"PYTHONPATH": str(EXAMPLE)})  # this checkout's example code

    # The bound only stops a hung run: it takes well under a minute on an idle machine.
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rounds = fed.metrics(out)
    assert summary["dataset"] == "japanese-vowels" and summary["devices"] == 3
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["accepted"] == 3 for r in rounds)
    assert len(summary["centralised_accuracy"]) == 3
    # 9 speakers: chance is 11 %; three short rounds already tell most of them apart.
    assert summary["federated_accuracy"][-1] > 0.5
    assert summary["centralised_accuracy"][-1] > 0.5
    assert "federated vs centralised" in done.stdout
    log = (out / "logs" / "aggregator.log").read_text()
    assert "model vowels-cnn (sensor_cnn.model:vowels from fedmq-sensor-cnn 1.0.0)" in log
