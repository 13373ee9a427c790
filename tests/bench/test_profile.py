"""The benchmark profiler's summary: which functions dominate a py-spy recording."""

from bench.profile import summarise

RAW = """\
<module> (fleetwatch/cli.py:10);run (/work/main/ingest/bridge.py:200);loads (json/__init__.py:346) 30
<module> (fleetwatch/cli.py:10);run (/work/main/ingest/bridge.py:200);_read (/s/site-packages/paho/mqtt/c.py:3) 60
<module> (fleetwatch/cli.py:10);flush (/work/main/ingest/kafka_out.py:90) 10
garbage line without count
"""


def test_summary_ranks_self_time_and_our_inclusive_time() -> None:
    out = summarise(RAW)
    assert out["samples"] == 100
    assert out["self_pct"][0] == ["_read (paho/mqtt/c.py)", 60.0]
    assert ["loads (json/__init__.py)", 30.0] in out["self_pct"]
    inclusive = dict(out["ours_inclusive_pct"])
    assert inclusive["run (ingest/bridge.py)"] == 90.0
    assert inclusive["flush (ingest/kafka_out.py)"] == 10.0
    assert not any("paho" in name for name in inclusive)


def test_empty_recording_gives_empty_summary() -> None:
    assert summarise("") == {"samples": 0, "self_pct": [], "ours_inclusive_pct": []}
