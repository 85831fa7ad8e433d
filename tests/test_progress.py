"""Progress lines of long loops (progress.py): counts, rate, ETA, and how often they are logged."""

import logging

from mixreorg_jax import progress


def test_lines_count_rate_and_eta_at_most_every_interval(monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO)
    report = progress.Progress(4, "preparing train", unit="files", every_seconds=30)

    def step(seconds):
        clock[0] += seconds
        report.update()
        return [r.getMessage() for r in caplog.records]

    assert step(10) == []  # 10 s since the start: not yet
    assert step(30) == ["preparing train: 2/4 files (50%), 0.05 files/s, ETA 0:00:40"]
    assert len(step(5)) == 1  # 5 s since the last line
    assert step(5)[-1] == "preparing train: 4/4 files (100%) in 0:00:50, 0.08 files/s"


def test_unknown_total_and_empty_work():
    assert progress.Progress(None, "reading", unit="rows").line() == "reading: 0 rows, 0 rows/s"
    assert progress.Progress(0, "nothing").line().startswith("nothing: 0/0 items (100%) in")
    assert progress.duration(3725.4) == "1:02:05"
