"""``fedmq bench compression`` bookkeeping (no federation is run here)."""

from __future__ import annotations

import argparse

from aggregator.ops.bench.compression import (
    SIZING,
    _raw_fp32_bytes,
    _relative_to_fp32,
    add_arguments,
    download_codec,
    markdown_table,
)


def _row(codec: str, dl: str, up: float, down: float) -> dict[str, object]:
    return {
        "codec": codec,
        "download_codec": dl,
        "finished": True,
        "bytes_up_per_client_round": up,
        "bytes_down_per_client_round": down,
        "bytes_down_per_client_round_after_1": down * 0.8,
        "final_test_accuracy": 0.8,
        "encode_mb_s": 100.0,
        "decode_mb_s": 200.0,
    }


def test_only_the_fp32_baseline_downloads_full_models() -> None:
    args = add_arguments_parsed([])
    assert args.download_codec == "int8"
    assert download_codec("fp32", args.download_codec) == "none"
    assert download_codec("int8", args.download_codec) == "int8"
    assert download_codec("topk1:0.02@warmup2", "fp16") == "fp16"


def test_table_shows_download_codec_and_both_ratios() -> None:
    rows = [_row("fp32", "none", 207_000, 228_000), _row("int8", "int8", 49_600, 57_000)]
    _relative_to_fp32(rows, raw_fp32=248_000)

    table = markdown_table(rows, "cmd")

    assert "| `int8` | `int8` | 49,600 | 57,000 | 45,600 | 4.2× | 5.0× | 4.0× |" in table
    assert "| `fp32` | `none` | 207,000 | 228,000 | 182,400 | 1.0× | 1.2× | 1.0× |" in table


def test_raw_fp32_size_is_four_bytes_per_parameter() -> None:
    assert _raw_fp32_bytes("lenet5") == 4 * 61_706
    assert _raw_fp32_bytes("cnn") == 4 * 1_663_370


def test_default_codecs_depend_on_the_model() -> None:
    args = add_arguments_parsed(["--model", "cnn"])
    assert args.codecs is None  # resolved per model in run_compression (SIZING)
    assert "lowrank" in SIZING["cnn"]["codecs"] and "lowrank" in SIZING["lenet5"]["codecs"]


def add_arguments_parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)
