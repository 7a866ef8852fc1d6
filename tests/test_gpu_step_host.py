"""bench/gpu_step_host.py splits training steps into queueing and waiting (here on the CPU,
where NumPy finishes each operation before returning, so a step is all queue)."""

import json

from bench import gpu_step_host


def test_steps_split_into_queue_and_wait(tmp_path, capsys):
    out = tmp_path / "host.json"
    gpu_step_host.main(["--device", "cpu", "--batch", "2", "--steps", "2", "--out", str(out)])
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == ["gc on", "gc off"]
    for times in steps.values():
        assert len(times) == 2
        assert all(t["queue_s"] > 0.01 and t["wait_s"] < t["queue_s"] for t in times)
    assert "queue ms" in capsys.readouterr().out
