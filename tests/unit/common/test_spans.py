"""Spans and the trace: busy fractions worked out by hand, and a trace Chrome and Perfetto read."""

from __future__ import annotations

import json

import pytest

from common.spans import Span, Spans, Trace, busy_fraction


def test_busy_fraction_clips_spans_to_the_window_and_shares_it_among_actors():
    spans = [Span("generate", "rollout worker 0", 0.0, 4.0), Span("generate", "rollout worker 1", 8.0, 4.0),
             Span("train", "learner", 2.0, 5.0), Span("reload", "rollout worker 0", 5.0, 1.0)]
    # Window [2, 10] (8 s), 2 engines: worker 0 generates 2-4 (2 s), worker 1 8-10 (2 s).
    assert busy_fraction(spans, {"generate"}, 2.0, 10.0, actors=2) == pytest.approx(4 / 16)
    assert busy_fraction(spans, {"train"}, 2.0, 10.0, actors=1) == pytest.approx(5 / 8)
    assert busy_fraction(spans, {"train"}, 20.0, 30.0, actors=1) == 0.0


def test_spans_are_stamped_with_the_step_and_taken_once():
    spans = Spans("learner")
    spans.step = 3
    with spans.span("train"):
        pass
    [span] = spans.take()
    assert (span.name, span.actor, span.step) == ("train", "learner", 3) and span.seconds >= 0
    assert spans.take() == []


def test_a_span_since_the_process_started_begins_at_its_start_time():
    import time

    import psutil

    spans = Spans("rollout worker 0")
    spans.since_process_start("start process")
    [span] = spans.take()
    assert span.start == psutil.Process().create_time()
    assert span.start + span.seconds == pytest.approx(time.time(), abs=1.0)


def test_the_trace_is_chrome_trace_json_with_a_named_row_per_actor(tmp_path):
    trace = Trace(tmp_path / "trace.json")
    trace.add([Span("train", "learner", 100.0, 0.5, 1), Span("generate", "rollout worker 0", 100.2, 0.25, 1)])
    trace.add([Span("train", "learner", 101.0, 0.5, 2)])
    trace.write()
    data = json.loads((tmp_path / "trace.json").read_text())
    rows = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M"}
    assert sorted(rows.values()) == ["learner", "rollout worker 0"]
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert [(rows[e["tid"]], e["name"], e["ts"], e["dur"], e["args"]["step"]) for e in events] == [
        ("learner", "train", 100e6, 0.5e6, 1), ("rollout worker 0", "generate", 100.2e6, 0.25e6, 1),
        ("learner", "train", 101e6, 0.5e6, 2)]
