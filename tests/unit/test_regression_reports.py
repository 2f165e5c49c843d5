"""Regression rounds in the operator's views: the round table, the monitor, the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.ops.monitor import RoundTable, quality_cell
from aggregator.ops.report import plot_metrics, summarize
from shared.protocol import messages as msg
from shared.protocol.topics import Topics


def _metrics(round_id: int, **quality: object) -> msg.RoundMetrics:
    return msg.RoundMetrics(
        federation="demo",
        round=round_id,
        participants=["pi-0"],
        accepted=1,
        rejected=0,
        num_samples=100,
        **quality,  # type: ignore[arg-type]
    )


def test_a_regression_round_shows_its_rmse_a_classification_round_its_accuracy() -> None:
    assert quality_cell(_metrics(1, task="regression", test_rmse=0.25, test_mae=0.2)) == (
        "rmse 0.25"
    )
    assert quality_cell(_metrics(1, test_accuracy=0.5)) == "50.00%"


def test_the_round_table_prints_a_regression_round(capsys: pytest.CaptureFixture[str]) -> None:
    table = RoundTable("mqtt://127.0.0.1:1883", "demo", rounds_total=2)  # never connected
    payload = _metrics(1, task="regression", test_rmse=1.5, test_loss=2.25).to_json()

    table._on_message(Topics("demo").metrics, payload, False)

    assert "rmse 1.5" in capsys.readouterr().out


def test_the_report_of_a_regression_run_sums_up_errors(tmp_path: Path) -> None:
    rounds = [
        msg.to_builtins(
            _metrics(r, task="regression", test_rmse=1.0 / r, test_mae=0.5 / r, test_loss=1.0)
        )
        for r in (1, 2)
    ]

    summary = summarize(rounds)
    png = plot_metrics(rounds, tmp_path / "run.png")

    assert summary["final_test_rmse"] == 0.5 and summary["final_test_mae"] == 0.25
    assert "final_test_accuracy" not in summary
    assert png.stat().st_size > 0
