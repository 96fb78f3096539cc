"""A call as a picture (upvoot.console.timeline) and `upvoot calls show --svg`:
the SVG parses, holds one bar per stretch of speech where the events put
it, the barge-ins, interims, silence prompts, latency stacks and the end,
and no text from the call can break out of it."""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET

import pytest

from upvoot.cli import main
from upvoot.console import timeline
from upvoot.console.timeline import PLOT_LEFT, PLOT_RIGHT, WIDTH
from upvoot.ledger import store
from upvoot.ledger.store import CallRecord

SVG = "{http://www.w3.org/2000/svg}"


def known_call() -> dict:
    """A 30 s call: greeting; a question with an interim; a reply the caller
    talks over briefly (resumed); a second question, its reply cut by the
    caller (confirmed), answered again; a silence prompt; the caller hangs up."""
    ev = [
        (0.0, "agent_start"), (5.9, "agent_end", {"interrupted": False}),
        (7.0, "caller_start"), (7.5, "interim", {"text": "What are"}), (8.2, "caller_end"),
        (9.16, "agent_start"), (10.0, "caller_start"), (10.1, "barge_in"), (10.4, "caller_end"),
        (10.4, "barge_in_resumed"), (13.6, "agent_end", {"interrupted": False}),
        (15.0, "caller_start"), (16.2, "caller_end"), (17.0, "agent_start"),
        (17.5, "caller_start"), (17.6, "barge_in"), (17.9, "clear"), (17.9, "agent_end", {"interrupted": True}),
        (18.5, "caller_end"), (19.2, "agent_start"), (21.0, "agent_end", {"interrupted": False}),
        (27.0, "silence_prompt"), (27.0, "agent_start"), (28.2, "agent_end", {"interrupted": False}),
        (30.0, "end", {"reason": "hangup"}),
    ]
    return {
        "call_id": "call-7", "account": "acme", "agent": "demo", "provider": "raw", "duration": 30.0,
        "end_reason": "hangup", "turns": 3,
        "transcript": [
            {"role": "agent", "text": "Hello! You have reached the UpVoot demo.", "t": 5.9},
            {"role": "caller", "text": "What are your opening hours?", "t": 8.9},
            {"role": "agent", "text": "We are open from nine to five.", "t": 13.6},
            {"role": "caller", "text": "Where are you?", "t": 16.7},
            {"role": "agent", "text": "You will find", "t": 17.9, "interrupted": True},
            {"role": "caller", "text": "Sorry, where exactly?", "t": 18.9},
            {"role": "agent", "text": "At twelve Station Road.", "t": 21.0},
            {"role": "agent", "text": "Are you still there?", "t": 28.2},
        ],
        "metadata": {
            "latencies": [
                {"end_of_turn": 0.6, "turn_model": 0.05, "transcription": 0.2, "brain_first_token": 0.01,
                 "first_audio": 0.1, "voice_to_voice": 0.96},
                {"endpointing": 0.6, "transcription": 0.15, "first_token": 0.0, "first_audio": 0.05,
                 "voice_to_voice": 0.8},  # a record written before the turn model
                {"end_of_turn": 0.4, "turn_model": 0.1, "transcription": 0.1, "brain_first_token": 0.0,
                 "first_audio": 0.1, "voice_to_voice": 0.7},
            ],
            "timeline": [{"t": e[0], "kind": e[1], **(e[2] if len(e) > 2 else {})} for e in ev],
        },
    }


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg.encode("utf-8"))
    assert root.tag == SVG + "svg"
    assert root.get("width") == str(WIDTH)
    return root


def having(root: ET.Element, *classes: str) -> list[ET.Element]:
    return [el for el in root.iter() if set(classes) <= set((el.get("class") or "").split())]


def x_of(t: float, span: float) -> float:
    return PLOT_LEFT + t * (PLOT_RIGHT - PLOT_LEFT) / span


def test_the_known_call_has_its_bars_where_the_events_put_them():
    root = parse(timeline.render(known_call()))
    agent = having(root, "speech", "agent")
    caller = having(root, "speech", "caller")
    assert len(agent) == 5 and len(caller) == 4
    assert all(el.tag == SVG + "rect" for el in agent + caller)
    starts = [(float(el.get("x")), float(el.get("x")) + float(el.get("width"))) for el in agent]
    expected = [(0.0, 5.9), (9.16, 13.6), (17.0, 17.9), (19.2, 21.0), (27.0, 28.2)]
    for (x0, x1), (t0, t1) in zip(starts, expected):
        assert x0 == pytest.approx(x_of(t0, 30.0), abs=0.1) and x1 == pytest.approx(x_of(t1, 30.0), abs=0.2)
    assert [el in having(root, "interrupted") for el in agent] == [False, False, True, False, False]
    # each bar's tooltip holds what was said in it
    assert "What are your opening hours?" in caller[0].find(SVG + "title").text
    assert "You will find" in agent[2].find(SVG + "title").text
    assert caller[1].find(SVG + "title").text == "caller 10.0\u201310.4 s"  # the resumed barge-in said nothing

    assert len(having(root, "barge-in", "confirmed")) == 1 and len(having(root, "barge-in", "resumed")) == 1
    assert float(having(root, "barge-in", "resumed")[0].get("x1")) == pytest.approx(x_of(10.1, 30.0), abs=0.1)
    assert len(having(root, "interim")) == 1 and len(having(root, "silence-prompt")) == 1
    assert [el.text for el in having(root, "end-reason")] == ["end: hangup"]
    assert "end: hangup" in having(root, "title")[0].text


def test_each_answered_turn_has_a_stacked_latency_bar_ending_where_its_reply_starts():
    root = parse(timeline.render(known_call()))
    groups = having(root, "latency")
    assert [g.get("data-turn") for g in groups] == ["1", "2", "3"]
    stages = [[r.get("class").split()[1] for r in g.iter(SVG + "rect")] for g in groups]
    assert stages[0] == ["end-of-turn", "turn-model", "transcription", "brain-first-token", "first-audio"]
    assert stages[1] == ["end-of-turn", "transcription", "first-audio"]  # the old keys, read as today's
    for group, reply_at, total in zip(groups, (9.16, 17.0, 19.2), (0.96, 0.8, 0.7)):
        rects = list(group.iter(SVG + "rect"))
        right = float(rects[-1].get("x")) + float(rects[-1].get("width"))
        assert right == pytest.approx(x_of(reply_at, 30.0), abs=0.3)
        assert float(rects[0].get("x")) == pytest.approx(x_of(reply_at - total, 30.0), abs=0.3)
    assert [t.text for t in having(root, "latency-total")] == ["960 ms", "800 ms", "700 ms"]


def test_the_picture_is_deterministic():
    call = known_call()
    assert timeline.render(call) == timeline.render(copy.deepcopy(call))
    shuffled = copy.deepcopy(call)
    shuffled["metadata"]["timeline"].reverse()  # events are drawn in time order, however they are stored
    assert timeline.render(shuffled).count('class="speech') == timeline.render(call).count('class="speech')


HOSTILE = [
    '</text></svg><script>alert(1)</script>',
    '"/><image href="http://evil.example/x.png" onload="alert(2)"/>',
    "]]><!ENTITY x SYSTEM 'file:///etc/passwd'>&x;",
    "nul\x00 esc\x1b bell\x07 vt\x0b bom\ufeff noncharacter\uffff lone\ud800surrogate",
    "<foreignObject><body xmlns='http://www.w3.org/1999/xhtml'><iframe/></body></foreignObject>",
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_text_from_the_call_stays_text(hostile):
    call = known_call()
    for entry in call["transcript"]:
        entry["text"] = hostile
    call.update(agent=hostile, account=hostile, call_id=hostile, end_reason=hostile, provider=hostile)
    for e in call["metadata"]["timeline"]:
        if e["kind"] == "interim":
            e["text"] = hostile
        if e["kind"] == "end":
            e["reason"] = hostile
    svg = timeline.render(call)
    root = parse(svg)  # still one well-formed SVG document
    assert {el.tag for el in root.iter()} <= {SVG + t for t in ("svg", "rect", "text", "title", "line", "path", "g")}
    for el in root.iter():
        for name, value in el.attrib.items():
            assert not name.lower().startswith("on") and "href" not in name
            assert "alert" not in value and "evil" not in value and "<" not in value
    texts = "".join(root.itertext())
    visible = re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800\uffff]", "", hostile)
    assert visible[:40] in texts  # shown, as text
    assert "<!ENTITY" not in svg and "\x00" not in svg


def test_odd_records_still_draw():
    # no timeline (records written before it existed): dots where the transcript says
    call = known_call()
    del call["metadata"]["timeline"]
    root = parse(timeline.render(call))
    assert having(root, "speech") == [] and len(having(root, "said-at")) == 8
    assert having(root, "latency") == []  # nothing to place them against
    # garbage events are skipped, an open bar is closed at the end
    call = {"call_id": "x", "duration": None, "metadata": {"timeline": [
        {"t": "soon", "kind": "agent_start"}, {"t": float("nan"), "kind": "caller_start"}, {"t": -1, "kind": "agent_start"},
        {"t": 1.0, "kind": 5}, "not a dict", {"kind": "agent_start"}, {"t": 2.0, "kind": "caller_start"},
        {"t": 1e300, "kind": "nonsense"},
    ], "latencies": "nope"}, "transcript": [None, {"role": "caller", "t": "x"}]}
    root = parse(timeline.render(call))
    bars = having(root, "speech", "caller")
    assert len(bars) == 1 and float(bars[0].get("x")) == pytest.approx(x_of(2.0, timeline.MAX_SPAN), abs=0.1)
    parse(timeline.render({}))
    parse(timeline.render({"metadata": "a string", "transcript": {"not": "a list"}, "duration": "long"}))
    parse(timeline.render({"metadata": {"timeline": 5, "latencies": [{"voice_to_voice": "fast"}]}}))


def test_the_page_reads_the_same_geometry():
    """history.js moves the recording's cursor with these numbers."""
    from pathlib import Path

    js = (Path(timeline.__file__).parent / "static" / "history.js").read_text()
    geometry = (("SVG_WIDTH", WIDTH), ("PLOT_LEFT", PLOT_LEFT), ("PLOT_RIGHT", PLOT_RIGHT),
                ("MAX_SPAN", int(timeline.MAX_SPAN)))
    for name, value in geometry:
        assert re.search(rf"\b{name} = {value};", js), name


# ---- the CLI -----------------------------------------------------------------------------------------


def test_calls_show_svg_writes_the_picture(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("UPVOOT_CONFIG", raising=False)
    ini = tmp_path / "upvoot.ini"
    ini.write_text("[upvoot]\ndatabase = upvoot.sqlite3\n\n[agent:demo]\ngreeting = Hello!\n")

    def cli(*argv):
        with pytest.raises(SystemExit) as e:
            main(["--config", str(ini), *argv])
        out, err = capsys.readouterr()
        assert e.value.code == 0, err
        return out

    prefix = cli("keys", "create", "--agent", "demo", "--account", "acme").strip()[:12]
    call = known_call()
    conn = store.connect(str(tmp_path / "upvoot.sqlite3"))
    try:
        store.transact(conn, store.settle_call, CallRecord(
            call_id="call-7", key_prefix=prefix, account="acme", agent="demo", provider="raw",
            started_at=1_700_000_000.0, ended_at=1_700_000_030.0, duration=30.0, end_reason="hangup",
            turns=3, points_charged=1, transcript=call["transcript"], metadata=call["metadata"]))
    finally:
        conn.close()
    out = tmp_path / "call.svg"
    assert cli("calls", "show", "call-7", "--svg", str(out)) == ""
    root = parse(out.read_text(encoding="utf-8"))
    assert len(having(root, "speech", "agent")) == 5 and len(having(root, "speech", "caller")) == 4
    assert len(having(root, "latency")) == 3
    assert cli("calls", "show", "call-7", "--svg", "-") == out.read_text(encoding="utf-8")

    with pytest.raises(SystemExit) as e:
        main(["--config", str(ini), "calls", "show", "call-7", "--svg", str(tmp_path / "no" / "such.svg")])
    assert e.value.code == 1 and "cannot write" in capsys.readouterr().err
