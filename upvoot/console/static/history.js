// History: the call records (GET api/calls with filters), and one call:
// its record, transcript, latency split, the timeline picture (the
// daemon's SVG, shown as an <img>: nothing in it can run) and, when the
// call was recorded, a player whose waveform and cursor run along the
// picture's time axis.

import { api, byId, clear, h, latencyTable, notice, transcriptItems, when } from "./util.js";

// The picture's geometry (upvoot/console/timeline.py: WIDTH, PLOT_LEFT, PLOT_RIGHT, span()).
export const SVG_WIDTH = 960;
export const PLOT_LEFT = 110;
export const PLOT_RIGHT = 940;
export const MAX_SPAN = 86400;

let shown = null; // {call, span, frame}

function epoch(input) {
  return input.value ? String(new Date(input.value).getTime() / 1000) : "";
}

export async function search(event) {
  if (event) event.preventDefault();
  const query = new URLSearchParams();
  const filters = {
    account: byId("f-account").value.trim(), agent: byId("f-agent").value.trim(),
    end_reason: byId("f-end-reason").value, since: epoch(byId("f-since")), until: epoch(byId("f-until")),
    limit: byId("f-limit").value,
  };
  for (const [k, v] of Object.entries(filters)) if (v) query.set(k, v);
  let data;
  try {
    data = await api(`calls?${query}`);
  } catch (e) {
    notice(`Could not list calls: ${e.message}`, "error");
    return;
  }
  const body = clear(byId("history-table").tBodies[0]);
  for (const c of data.calls || []) {
    const id = String(c.call_id ?? "");
    const open = h("a", { href: `#call=${encodeURIComponent(id)}` }, id);
    body.append(h("tr", { dataset: { callId: id } },
      h("td", {}, when(c.started_at)), h("td", {}, open), h("td", {}, String(c.account ?? "")),
      h("td", {}, String(c.agent ?? "")), h("td", {}, String(c.provider ?? "")),
      h("td", { class: "num" }, typeof c.duration === "number" ? c.duration.toFixed(1) : "-"),
      h("td", { class: "num" }, String(c.turns ?? "-")), h("td", { class: "num" }, String(c.points_charged ?? "-")),
      h("td", {}, String(c.end_reason ?? c.state ?? ""))));
  }
}

// The seconds the picture's axis covers (as timeline.span(call) computes it).
export function span(call) {
  const times = [typeof call.duration === "number" ? call.duration : 0];
  const timeline = (call.metadata && call.metadata.timeline) || call.timeline || [];
  for (const e of timeline) if (e && typeof e.t === "number" && isFinite(e.t) && e.t >= 0) times.push(e.t);
  for (const e of call.transcript || []) if (e && typeof e.t === "number" && isFinite(e.t) && e.t >= 0) times.push(e.t);
  return Math.min(MAX_SPAN, Math.max(1, ...times));
}

export async function openCall(id) {
  let call;
  try {
    call = await api(`calls/${encodeURIComponent(id)}`);
  } catch (e) {
    notice(`Could not open call ${id}: ${e.message}`, "error");
    return;
  }
  call = call.call || call;
  stopCursor();
  shown = { call, span: span(call) };
  byId("call-detail").hidden = false;
  byId("detail-title").textContent = `Call ${call.call_id} · ${call.agent ?? ""} · ${call.account ?? ""}`;
  const img = byId("detail-svg");
  img.src = `api/calls/${encodeURIComponent(id)}/timeline.svg`;
  transcriptItems(byId("detail-transcript"), call.transcript);
  latencyTable(byId("detail-latency"), (call.metadata || {}).latencies);
  const meta = clear(byId("detail-meta"));
  const skip = new Set(["transcript", "metadata", "timeline", "key"]);
  const times = new Set(["started_at", "ended_at", "heartbeat_at"]);
  for (const [k, v] of Object.entries(call)) {
    if (skip.has(k)) continue;
    meta.append(h("dt", {}, k), h("dd", {}, times.has(k) ? when(v) : String(v ?? "-")));
  }
  for (const [k, v] of Object.entries(call.metadata || {})) {
    if (k === "timeline" || k === "latencies") continue;
    meta.append(h("dt", {}, `metadata.${k}`), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v)));
  }
  await recording(id, call);
  byId("call-detail").scrollIntoView({ block: "start" });
}

async function recording(id, call) {
  const audio = byId("detail-audio");
  const wave = byId("detail-wave");
  const cursor = byId("detail-cursor");
  audio.hidden = wave.hidden = cursor.hidden = true;
  audio.removeAttribute("src");
  if (!(call.has_recording ?? (call.metadata || {}).recording)) return;
  const url = `api/calls/${encodeURIComponent(id)}/recording`;
  let buffer;
  try {
    let response = null;
    for (let attempt = 0; attempt < 6; attempt++) { // the WAV is written just after the call's record
      response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status !== 404 || shown === null || shown.call !== call) break;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    if (!response.ok) return;
    const decoder = new OfflineAudioContext(1, 1, 16000);
    buffer = await decoder.decodeAudioData(await response.arrayBuffer());
  } catch (e) {
    notice(`Could not read the recording: ${e.message}`, "error");
    return;
  }
  if (shown === null || shown.call !== call) return;
  audio.src = url;
  audio.hidden = wave.hidden = cursor.hidden = false;
  drawWave(wave, buffer, shown.span);
  placeCursor(0);
  audio.onplay = () => tick();
  audio.onpause = audio.onended = () => stopCursor(true);
  audio.onseeked = audio.ontimeupdate = () => placeCursor(audio.currentTime);
  wave.onclick = (e) => {
    const frac = (e.offsetX / wave.clientWidth * SVG_WIDTH - PLOT_LEFT) / (PLOT_RIGHT - PLOT_LEFT);
    audio.currentTime = Math.max(0, Math.min(buffer.duration, frac * shown.span));
  };
}

// The recording's two channels (left the caller, right the agent) drawn over
// the picture's time axis: the agent above the line, the caller below.
function drawWave(canvas, buffer, total) {
  const width = SVG_WIDTH;
  const height = 80;
  canvas.width = width;
  canvas.height = height;
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  const scale = (PLOT_RIGHT - PLOT_LEFT) / total;
  const channels = [buffer.getChannelData(0), buffer.getChannelData(buffer.numberOfChannels > 1 ? 1 : 0)];
  const colours = ["#2f855a", "#2b6cb0"]; // caller, agent
  const rate = buffer.sampleRate;
  for (let c = 0; c < 2; c++) {
    g.fillStyle = colours[c];
    for (let x = PLOT_LEFT; x < PLOT_RIGHT; x++) {
      const from = Math.floor(((x - PLOT_LEFT) / scale) * rate);
      const to = Math.min(channels[c].length, Math.floor(((x + 1 - PLOT_LEFT) / scale) * rate));
      let peak = 0;
      for (let i = from; i < to; i++) peak = Math.max(peak, Math.abs(channels[c][i]));
      const bar = Math.max(peak > 0 ? 1 : 0, peak * (height / 2 - 2));
      if (c === 1) g.fillRect(x, height / 2 - bar, 1, bar);
      else g.fillRect(x, height / 2, 1, bar);
    }
  }
}

function placeCursor(t) {
  if (!shown) return;
  const box = byId("detail-timeline");
  const x = PLOT_LEFT + Math.min(Math.max(t, 0), shown.span) * (PLOT_RIGHT - PLOT_LEFT) / shown.span;
  byId("detail-cursor").style.left = `${(x / SVG_WIDTH) * box.clientWidth}px`; // CSSOM, allowed by the CSP
}

function tick() {
  placeCursor(byId("detail-audio").currentTime);
  shown.frame = requestAnimationFrame(tick);
}

function stopCursor(keep) {
  if (shown && shown.frame) cancelAnimationFrame(shown.frame);
  if (shown) shown.frame = null;
  if (!keep) byId("detail-cursor").hidden = true;
}

export function setUpHistory() {
  byId("history-form").addEventListener("submit", search);
  window.addEventListener("resize", () => placeCursor(byId("detail-audio").currentTime));
}
