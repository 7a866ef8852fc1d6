"""bench/bench_step.py runs end to end: every row, both implementations, the JSON it writes."""

import json

import pytest

pytest.importorskip("torch")

from bench import bench_step  # noqa: E402


def test_bench_step_of_a_small_batch(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--batch", "2", "--repeats", "2", "--min-row-seconds", "0", "--skip-memory", "--out", str(out)]
    assert bench_step.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["train step, batch 2", "sample step, batch 16", "sample step, batch 2"]
    for row in rows.values():
        for impl in ("tinyddpm", "torch"):
            assert len(row[impl]["times_s"]) == 2 and row[impl]["min"] > 0
        assert row["ratio"] == pytest.approx(row["tinyddpm"]["median"] / row["torch"]["median"])
        pairs = [a / b for a, b in zip(row["tinyddpm"]["times_s"], row["torch"]["times_s"])]
        assert row["paired_ratio"] == pytest.approx(sum(pairs) / 2)  # the median of two
        assert row["ratio_of_mins"] == pytest.approx(min(row["tinyddpm"]["times_s"]) / min(row["torch"]["times_s"]))
    table = capsys.readouterr().out
    assert "paired" in table and "of mins" in table


def test_short_rows_get_more_rounds():
    class Bench:
        def __init__(self, name):
            self.name = name

        def sync(self):
            pass

    benches = [Bench("tinyddpm"), Bench("torch")]
    times = bench_step.time_row(benches, lambda b: (lambda: None), 3, "row", min_seconds=1e9)
    assert len(times["tinyddpm"]) == len(times["torch"]) == bench_step.MAX_ROUNDS
    times = bench_step.time_row(benches, lambda b: (lambda: None), 3, "row", min_seconds=0)
    assert len(times["tinyddpm"]) == 3
