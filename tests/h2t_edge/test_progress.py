"""Progress output: a live bar on a terminal, a few plain lines in a log."""

import io

from h2t_edge.core import progress
from h2t_edge.core.progress import StageBars


def _run(bars: StageBars, total: int, stage: str = "extract") -> None:
    for done in range(total + 1):
        bars(stage, done, total)


def test_log_gets_a_few_plain_lines(monkeypatch):
    monkeypatch.setattr(progress, "LOG_MIN_SECONDS", 0.0)
    out = io.StringIO()
    _run(StageBars(stream=out), 1000)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # start, 25 / 50 / 75 %, done
    assert len(lines) == 5, lines
    assert lines[0] == "extract: 0/1000"
    assert lines[1].startswith("extract: 250/1000 (25%")
    assert lines[-1].startswith("extract: 1000/1000 done in ")


def test_log_lines_are_rate_limited(monkeypatch):
    monkeypatch.setattr(progress, "LOG_MIN_SECONDS", 3600.0)
    out = io.StringIO()
    _run(StageBars(stream=out), 200)
    lines = out.getvalue().splitlines()
    assert [line.split(" done")[0] for line in lines] == ["extract: 0/200", "extract: 200/200"]


def test_stage_closed_early_says_where_it_stopped():
    out = io.StringIO()
    bars = StageBars(stream=out)
    bars("fit", 3, 10)
    bars.close()
    assert out.getvalue().splitlines()[-1].startswith("fit: stopped at 3/10 after ")


def test_stage_already_complete_prints_one_line():
    out = io.StringIO()
    StageBars(stream=out)("extract", 4, 4)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("extract: 4/4 done in ")


def test_terminal_gets_a_live_bar():
    out = io.StringIO()
    _run(StageBars(stream=out, live=True), 50)
    assert "\r" in out.getvalue()  # tqdm redraws in place


def test_quiet_prints_nothing():
    out = io.StringIO()
    _run(StageBars(False, stream=out), 10)
    assert out.getvalue() == ""
