"""One call as a picture: ``render(call)`` draws a call record as SVG.

On one time axis (seconds since the call started): the agent's speech and
the caller's speech as bars (``agent_start``..``agent_end``,
``caller_start``..``caller_end`` of ``metadata["timeline"]``; an agent
bar cut by the caller is drawn open), interim transcripts as ticks on the
caller's lane, barge-ins as lines across both lanes (solid: confirmed, the
agent stopped; dashed: resumed, the agent went on), silence prompts and
the end with its reason, and under them each answered turn's latency split
(``metadata["latencies"]``: end of turn, turn model, transcription, brain,
first audio) as a stacked bar that ends where the reply started playing.

Every text from the call (transcripts, agent and account names, end
reason, interims) is escaped and stripped of characters XML cannot hold;
no value from the call reaches an attribute but numbers this module
formats. Styling is presentation attributes (no ``<style>``, no script),
so the file looks the same as an ``<img>``, opened alone, or converted.
The output depends only on the call: the same record, the same bytes.

The geometry (``WIDTH``, ``PLOT_LEFT``, ``PLOT_RIGHT`` and the span,
``span(call)``) is read by the console page to move a recording's cursor
along the picture.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable
from xml.sax.saxutils import escape

from upvoot.call.outcome import STAGES, read_latency

WIDTH = 960
PLOT_LEFT = 110  # x of t = 0
PLOT_RIGHT = 940  # x of t = span
HEIGHT = 256

_AGENT_Y, _CALLER_Y, _LANE_H = 48, 96, 30
_EVENTS_Y, _LATENCY_Y, _LATENCY_H, _AXIS_Y, _LEGEND_Y = 140, 162, 22, 204, 244

COLOURS = {
    "agent": "#2b6cb0", "caller": "#2f855a", "interim": "#68d391",
    "confirmed": "#e53e3e", "resumed": "#dd6b20", "silence_prompt": "#805ad5", "end": "#1a202c",
    "end_of_turn": "#a0aec0", "turn_model": "#718096", "transcription": "#d69e2e",
    "brain_first_token": "#ed64a6", "first_audio": "#9f7aea",
}
STAGE_NAMES = {
    "end_of_turn": "end of turn", "turn_model": "turn model", "transcription": "transcription",
    "brain_first_token": "brain", "first_audio": "first audio",
}
_FONT = 'font-family="sans-serif"'
#: Characters XML 1.0 cannot hold (control characters, lone surrogates, U+FFFE/U+FFFF).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_TICK_STEPS = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
_MAX_LABEL = 200  # characters of one text kept in the picture (tooltips included)
MAX_SPAN = 86400.0  # seconds: a longer axis (a broken record) is cut here


def text(value: Any, limit: int = _MAX_LABEL) -> str:
    """``value`` as XML character data or attribute text: escaped, without
    the characters XML forbids, cut to ``limit`` characters."""
    s = _NOT_XML.sub("", str(value))
    if len(s) > limit:
        s = s[: limit - 1] + "\u2026"
    return escape(s, {'"': "&quot;", "'": "&apos;"})


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _n(x: float) -> str:
    """A coordinate: one decimal, no trailing zero, never "-0"."""
    s = f"{x:.1f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def events(call: dict) -> list[dict]:
    """The call's timeline events with a usable time, in time order (stable)."""
    raw = _meta(call).get("timeline") or call.get("timeline") or ()
    if not isinstance(raw, (list, tuple)):
        return []
    good = [e for e in raw if isinstance(e, dict) and _num(e.get("t")) is not None and isinstance(e.get("kind"), str)]
    return sorted(good, key=lambda e: float(e["t"]))


def _meta(call: dict) -> dict:
    meta = call.get("metadata")
    return meta if isinstance(meta, dict) else {}


def span(call: dict) -> float:
    """The seconds the axis covers: the call's duration, or its last event
    or transcript entry if later; at least one second, at most ``MAX_SPAN``."""
    times = [_num(call.get("duration")) or 0.0]
    times += [float(e["t"]) for e in events(call)]
    times += [t for t in (_num(e.get("t")) for e in _transcript(call)) if t is not None]
    return min(MAX_SPAN, max(1.0, max(times)))


def _transcript(call: dict) -> list[dict]:
    transcript = call.get("transcript")
    return [e for e in transcript if isinstance(e, dict)] if isinstance(transcript, (list, tuple)) else []


def speech_bars(timeline: list[dict], end: float) -> list[dict]:
    """``{"role", "start", "end", "interrupted"}`` for each stretch of
    speech, in order of start; a stretch still open at the end of the
    timeline ends at ``end``."""
    bars: list[dict] = []
    open_: dict[str, dict] = {}
    for e in timeline:
        kind, t = e["kind"], float(e["t"])
        role, _, edge = kind.partition("_")
        if role not in ("caller", "agent") or edge not in ("start", "end"):
            continue
        if edge == "start":
            if role in open_:  # a start without an end: close the earlier one here
                open_.pop(role)["end"] = t
            bar = {"role": role, "start": t, "end": None, "interrupted": False}
            open_[role] = bar
            bars.append(bar)
        elif role in open_:
            bar = open_.pop(role)
            bar["end"] = t
            bar["interrupted"] = e.get("interrupted") is True
    for bar in open_.values():
        bar["end"] = max(bar["start"], end)
    return bars


def barge_ins(timeline: list[dict]) -> list[tuple[float, bool]]:
    """(time, resumed) of each barge-in: resumed when ``barge_in_resumed``
    follows it before the next barge-in, confirmed otherwise."""
    found: list[list] = []
    for e in timeline:
        if e["kind"] == "barge_in":
            found.append([float(e["t"]), False])
        elif e["kind"] == "barge_in_resumed" and found and not found[-1][1]:
            found[-1][1] = True
    return [(t, resumed) for t, resumed in found]


def reply_starts(timeline: list[dict]) -> list[float]:
    """When each answered turn's reply started playing: an ``agent_start``
    after the caller's end of speech (not after a silence prompt)."""
    starts, heard, prompted = [], False, False
    for e in timeline:
        kind = e["kind"]
        if kind == "caller_end":
            heard, prompted = True, False
        elif kind == "silence_prompt":
            prompted = True
        elif kind == "agent_start":
            if heard and not prompted:
                starts.append(float(e["t"]))
            heard = prompted = False
    return starts


def _labels(bars: list[dict], transcript: list[dict]) -> None:
    """Give each transcript entry to the latest bar of its role that started
    by the entry's time and has no text yet."""
    for entry in transcript:
        t = _num(entry.get("t"))
        role = entry.get("role")
        if t is None or role not in ("caller", "agent"):
            continue
        started = [b for b in bars if b["role"] == role and b["start"] <= t + 0.05]
        if started and "text" not in started[-1]:
            started[-1]["text"] = str(entry.get("text", ""))


def render(call: dict) -> str:
    """The call as a standalone SVG document (str)."""
    timeline = events(call)
    total = span(call)
    scale = (PLOT_RIGHT - PLOT_LEFT) / total

    def x(t: float) -> float:
        return PLOT_LEFT + min(max(t, 0.0), total) * scale

    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" class="upvoot-timeline" {_FONT} font-size="12">',
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="10" y="22" font-size="14" font-weight="bold" class="title">{text(_title(call, total))}</text>',
    ]
    for y, name in ((_AGENT_Y, "agent"), (_CALLER_Y, "caller")):
        out.append(f'<text x="10" y="{y + 19}" class="lane-label">{name.capitalize()}</text>')
        out.append(f'<rect x="{PLOT_LEFT}" y="{y}" width="{PLOT_RIGHT - PLOT_LEFT}" height="{_LANE_H}" fill="#f7fafc"/>')
    out.append(f'<text x="10" y="{_EVENTS_Y + 4}" class="lane-label">Events</text>')
    out.append(f'<text x="10" y="{_LATENCY_Y + 15}" class="lane-label">Latency</text>')
    out += _axis(total, x)

    bars = speech_bars(timeline, total)
    _labels(bars, _transcript(call))
    for bar in bars:
        out += _bar(bar, x)
    if not timeline:
        out += _transcript_marks(_transcript(call), x)
    for e in timeline:
        if e["kind"] == "interim":
            t = float(e["t"])
            out.append(f'<line class="interim" x1="{_n(x(t))}" y1="{_CALLER_Y - 4}" x2="{_n(x(t))}" '
                       f'y2="{_CALLER_Y + 4}" stroke="{COLOURS["interim"]}" stroke-width="2">'
                       f'<title>{text(f"{t:.1f} s interim: " + str(e.get("text", "")))}</title></line>')
        elif e["kind"] == "silence_prompt":
            out += _marker(float(e["t"]), x, "silence-prompt", COLOURS["silence_prompt"], "silence prompt")
    for t, resumed in barge_ins(timeline):
        colour = COLOURS["resumed" if resumed else "confirmed"]
        dash = ' stroke-dasharray="4 3"' if resumed else ""
        name = "barge-in (resumed)" if resumed else "barge-in (confirmed)"
        out.append(f'<line class="barge-in {"resumed" if resumed else "confirmed"}" x1="{_n(x(t))}" '
                   f'y1="{_AGENT_Y - 6}" x2="{_n(x(t))}" y2="{_CALLER_Y + _LANE_H + 6}" stroke="{colour}" '
                   f'stroke-width="2"{dash}><title>{text(f"{t:.1f} s {name}")}</title></line>')
    out += _latencies(call, timeline, x)
    out += _end(call, timeline, total, x)
    out += _legend()
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _title(call: dict, total: float) -> str:
    parts = [f"Call {call.get('call_id', '?')}"]
    parts += [str(call[k]) for k in ("agent", "account", "provider") if call.get(k)]
    duration = _num(call.get("duration"))
    parts.append(f"{(duration if duration is not None else total):.1f} s")
    if call.get("end_reason"):
        parts.append(f"end: {call['end_reason']}")
    return " \u00b7 ".join(parts)


def _axis(total: float, x) -> list[str]:
    step = next((s for s in _TICK_STEPS if total / s <= 12), _TICK_STEPS[-1])
    out = [f'<line x1="{PLOT_LEFT}" y1="{_AXIS_Y}" x2="{PLOT_RIGHT}" y2="{_AXIS_Y}" stroke="#4a5568"/>']
    for i in range(int(total // step) + 1):
        t = i * step
        label = f"{t:g}s" if step < 60 else f"{int(t // 60)}:{int(t % 60):02d}"
        out.append(f'<line x1="{_n(x(t))}" y1="{_AXIS_Y}" x2="{_n(x(t))}" y2="{_AXIS_Y + 5}" stroke="#4a5568"/>')
        out.append(f'<text x="{_n(x(t))}" y="{_AXIS_Y + 18}" text-anchor="middle" font-size="11" '
                   f'class="tick">{text(label)}</text>')
    return out


def _bar(bar: dict, x) -> list[str]:
    role, start, end = bar["role"], bar["start"], bar["end"]
    y = _AGENT_Y if role == "agent" else _CALLER_Y
    x0, width = x(start), max(1.0, x(end) - x(start))
    said = bar.get("text", "")
    cut = " (interrupted)" if bar["interrupted"] else ""
    tip = f"{role} {start:.1f}\u2013{end:.1f} s{cut}" + (f": {said}" if said else "")
    fill = COLOURS[role]
    style = (f'fill="{fill}" fill-opacity="0.35" stroke="{fill}" stroke-dasharray="3 2"' if bar["interrupted"]
             else f'fill="{fill}"')
    cls = f"speech {role}" + (" interrupted" if bar["interrupted"] else "")
    out = [f'<rect class="{cls}" x="{_n(x0)}" y="{y}" width="{_n(width)}" height="{_LANE_H}" rx="3" {style}>'
           f'<title>{text(tip)}</title></rect>']
    room = int((width - 8) / 6.5)  # characters that fit at font-size 11
    if said and room >= 4:
        label = said if len(said) <= room else said[: room - 1] + "\u2026"
        colour = "#1a202c" if bar["interrupted"] else "#ffffff"
        out.append(f'<text x="{_n(x0 + 4)}" y="{y + 19}" font-size="11" fill="{colour}" class="said">'
                   f'{text(label)}</text>')
    return out


def _transcript_marks(transcript: Iterable[dict], x) -> list[str]:
    """Without timeline events (older records): a dot where each line was said."""
    out = []
    for entry in transcript:
        t, role = _num(entry.get("t")), entry.get("role")
        if t is None or role not in ("caller", "agent"):
            continue
        y = (_AGENT_Y if role == "agent" else _CALLER_Y) + _LANE_H / 2
        out.append(f'<circle class="said-at {role}" cx="{_n(x(t))}" cy="{_n(y)}" r="5" fill="{COLOURS[role]}">'
                   f'<title>{text(f"{t:.1f} s {role}: " + str(entry.get("text", "")))}</title></circle>')
    return out


def _marker(t: float, x, cls: str, colour: str, name: str) -> list[str]:
    cx, y = x(t), _EVENTS_Y
    return [f'<path class="{cls}" d="M{_n(cx)} {y - 6} L{_n(cx + 6)} {y} L{_n(cx)} {y + 6} L{_n(cx - 6)} {y} Z" '
            f'fill="{colour}"><title>{text(f"{t:.1f} s {name}")}</title></path>']


def _latencies(call: dict, timeline: list[dict], x) -> list[str]:
    latencies = _meta(call).get("latencies")
    latencies = latencies if isinstance(latencies, (list, tuple)) else ()
    turns = [read_latency(t) for t in latencies if isinstance(t, dict)]
    out = []
    for i, (turn, reply_at) in enumerate(zip(turns, reply_starts(timeline)), 1):
        stages = [(s, _num(turn.get(s)) or 0.0) for s in STAGES]
        total = _num(turn.get("voice_to_voice"))
        total = sum(v for _, v in stages) if total is None else total
        t = max(0.0, reply_at - sum(v for _, v in stages))
        out.append(f'<g class="latency" data-turn="{i}">')
        for stage, seconds in stages:
            if seconds <= 0:
                continue
            tip = f"turn {i}: {STAGE_NAMES[stage]} {seconds * 1000:.0f} ms"
            out.append(f'<rect class="stage {stage.replace("_", "-")}" x="{_n(x(t))}" y="{_LATENCY_Y}" '
                       f'width="{_n(max(0.5, x(t + seconds) - x(t)))}" height="{_LATENCY_H}" '
                       f'fill="{COLOURS[stage]}"><title>{text(tip)}</title></rect>')
            t += seconds
        out.append(f'<text x="{_n(x(reply_at) + 3)}" y="{_LATENCY_Y + 15}" font-size="10" class="latency-total">'
                   f'{text(f"{total * 1000:.0f} ms")}</text>')
        out.append("</g>")
    return out


def _end(call: dict, timeline: list[dict], total: float, x) -> list[str]:
    ends = [e for e in timeline if e["kind"] == "end"]
    t = float(ends[-1]["t"]) if ends else _num(call.get("duration"))
    reason = (ends[-1].get("reason") if ends else None) or call.get("end_reason")
    if t is None:
        return []
    label = f"end: {reason}" if reason else "end"
    anchor = "end" if x(t) > PLOT_RIGHT - 80 else "start"
    dx = -4 if anchor == "end" else 4
    return [f'<line class="end" x1="{_n(x(t))}" y1="{_AGENT_Y - 14}" x2="{_n(x(t))}" y2="{_AXIS_Y}" '
            f'stroke="{COLOURS["end"]}" stroke-width="2"/>',
            f'<text class="end-reason" x="{_n(x(t) + dx)}" y="{_AGENT_Y - 4}" text-anchor="{anchor}" '
            f'font-size="11">{text(label)}</text>']


def _legend() -> list[str]:
    items = [("agent", "agent speech"), ("caller", "caller speech"), ("interim", "interim"),
             ("confirmed", "barge-in"), ("resumed", "barge-in, resumed"),
             ("silence_prompt", "silence prompt")]
    items += [(s, STAGE_NAMES[s]) for s in STAGES]
    out, cx, y = ['<g class="legend" font-size="10">'], 10.0, _LEGEND_Y
    for key, name in items:
        width = 14 + 5.5 * len(name)
        if cx + width > WIDTH - 10:
            cx, y = 10.0, y + 16
        out.append(f'<rect x="{_n(cx)}" y="{y - 9}" width="10" height="10" fill="{COLOURS[key]}"/>')
        out.append(f'<text x="{_n(cx + 14)}" y="{y}">{text(name)}</text>')
        cx += width + 8
    out.append("</g>")
    return out


def save(call: dict, target: Any) -> None:
    """Write ``render(call)`` to ``target``: a path (UTF-8) or a text file."""
    svg = render(call)
    if hasattr(target, "write"):
        target.write(svg)
        return
    with open(target, "w", encoding="utf-8") as f:
        f.write(svg)
