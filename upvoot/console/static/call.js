// "Try an agent": one call from this page to the daemon's public endpoint,
// exactly as a provider makes it.
//
// Call mints a single-use test key (POST api/test-key), opens a WebSocket to
// voice_url + key and speaks the raw protocol: binary 16 kHz mono s16le
// both ways (the microphone through mic-worklet.js, the agent through
// player-worklet.js), JSON control messages from the server (audio_start,
// audio_end, transcript, interim, turn_start), {"type": "end_call"} from
// us. The key is never shown, only its prefix.
//
// For tests and the curious, #rx carries data-bytes (agent audio received),
// data-level (RMS 0..1 of the latest frame) and data-played (samples played),
// #tx data-bytes (audio sent), #call-status data-state (idle, connecting,
// open, closed).

import { api, byId, bytes, clear, h, latencyTable, ms, notice, transcriptItems } from "./util.js";

let call = null; // the running call

function status(state, text) {
  const el = byId("call-status");
  el.dataset.state = state;
  el.textContent = text;
  byId("call").disabled = state === "connecting" || state === "open";
  byId("hangup").disabled = !(state === "connecting" || state === "open");
  byId("endcall").disabled = state !== "open";
}

export async function loadAgents() {
  const data = await api("agents");
  const agents = clear(byId("agent"));
  for (const a of data.agents || []) agents.append(h("option", { value: a.name }, a.name));
  const accounts = clear(byId("account"));
  for (const a of data.accounts || []) {
    accounts.append(h("option", { value: a.name }, `${a.name} (${a.available ?? a.points} points)`));
  }
  const agentNames = clear(byId("agent-names"));
  for (const a of data.agents || []) agentNames.append(h("option", { value: a.name }));
  const accountNames = clear(byId("account-names"));
  for (const a of data.accounts || []) accountNames.append(h("option", { value: a.name }));
  if (!(data.accounts || []).length) notice("No account yet: create one with `upvoot keys create` or `points add`.", "error");
}

function event(kind, detail) {
  const t = call ? ((performance.now() - call.opened) / 1000).toFixed(3) : "";
  const list = byId("events");
  list.append(h("li", { dataset: { kind } }, h("span", { class: "t" }, `+${t}s`), h("span", { class: "kind" }, kind),
    detail ? h("span", { class: "text" }, detail) : null));
  list.scrollTop = list.scrollHeight;
}

function resetView() {
  clear(byId("events"));
  clear(byId("transcript"));
  clear(byId("turns").tBodies[0]);
  byId("interim").textContent = "";
  byId("call-result").hidden = true;
  for (const id of ["rx", "tx"]) {
    const el = byId(id);
    el.dataset.bytes = "0";
    el.dataset.level = "0";
    el.dataset.played = "0";
  }
  byId("rx").textContent = "0 B received";
  byId("tx").textContent = "0 B sent";
}

async function start(event_) {
  event_.preventDefault();
  if (call) return;
  const agent = byId("agent").value;
  const account = byId("account").value;
  // the AudioContext is made inside the click, so that autoplay rules let it run
  const context = new AudioContext();
  const c = { context, agent, account, opened: performance.now(), rx: 0, tx: 0, turns: [], turn: null, closing: false };
  call = c;
  resetView();
  status("connecting", "Connecting…");
  try {
    await context.resume();
    const micReady = navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    await Promise.all([
      context.audioWorklet.addModule("static/mic-worklet.js"),
      context.audioWorklet.addModule("static/player-worklet.js"),
    ]);
    c.stream = await micReady;
    if (c.closing) throw new Error("hung up");
    const minted = await api("test-key", { method: "POST", body: { agent, account } });
    c.prefix = minted.prefix;
    if (c.closing) throw new Error("hung up");
    wire(c, minted);
  } catch (error) {
    if (!c.closing) notice(`Could not start the call: ${error.message}`, "error");
    finish(c, c.closing ? "Hung up" : `Failed: ${error.message}`);
  }
}

function wire(c, minted) {
  const { context } = c;
  c.player = new AudioWorkletNode(context, "upvoot-player", { numberOfInputs: 0, outputChannelCount: [1] });
  c.player.connect(context.destination);
  c.player.port.onmessage = (e) => {
    const rx = byId("rx");
    rx.dataset.played = String(e.data.played);
    byId("rx-meter").value = Math.min(1, e.data.level * 4);
    c.queued = e.data.queued;
  };
  c.source = context.createMediaStreamSource(c.stream);
  c.mic = new AudioWorkletNode(context, "upvoot-mic", { numberOfOutputs: 1, outputChannelCount: [1] });
  c.mute = context.createGain();
  c.mute.gain.value = 0; // the mic node must be pulled by the graph; its output is silence anyway
  c.source.connect(c.mic).connect(c.mute).connect(context.destination);

  const ws = new WebSocket(minted.voice_url + minted.key);
  c.ws = ws;
  ws.binaryType = "arraybuffer";
  c.mic.port.onmessage = (e) => {
    byId("tx-meter").value = Math.min(1, e.data.level * 4);
    if (ws.readyState !== WebSocket.OPEN || ws.bufferedAmount > 64000) return;
    ws.send(e.data.pcm);
    c.tx += e.data.pcm.byteLength;
    const tx = byId("tx");
    tx.dataset.bytes = String(c.tx);
    tx.textContent = `${bytes(c.tx)} sent`;
  };
  ws.onopen = () => {
    c.opened = performance.now();
    status("open", `In a call with ${c.agent} (key ${c.prefix}…)`);
    event("open", `key ${c.prefix}…`);
  };
  ws.onmessage = (e) => (typeof e.data === "string" ? control(c, e.data) : audio(c, e.data));
  ws.onerror = () => event("error", "WebSocket error");
  ws.onclose = (e) => {
    event("closed", `code ${e.code}${e.reason ? ` ${e.reason}` : ""}`);
    finish(c, `Call ended (code ${e.code})`);
  };
}

function audio(c, buffer) {
  c.rx += buffer.byteLength;
  if (c.turn && c.turn.firstAudio === undefined) {
    c.turn.firstAudio = performance.now();
    showTurn(c, c.turn);
  }
  let bytes8 = new Uint8Array(buffer);
  if (c.odd !== undefined) { // a sample split across two frames
    const joined = new Uint8Array(bytes8.length + 1);
    joined[0] = c.odd;
    joined.set(bytes8, 1);
    bytes8 = joined;
    c.odd = undefined;
  }
  if (bytes8.length % 2) {
    c.odd = bytes8[bytes8.length - 1];
    bytes8 = bytes8.subarray(0, bytes8.length - 1);
  }
  const pcm = bytes8.byteLength === buffer.byteLength ? buffer : bytes8.slice().buffer;
  const samples = new Int16Array(pcm);
  let energy = 0;
  for (let i = 0; i < samples.length; i++) energy += (samples[i] / 32768) ** 2;
  const rx = byId("rx");
  rx.dataset.bytes = String(c.rx);
  rx.dataset.level = (samples.length ? Math.sqrt(energy / samples.length) : 0).toFixed(4);
  rx.textContent = `${bytes(c.rx)} received`;
  c.player.port.postMessage({ pcm }, [pcm]);
}

function control(c, text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch (e) {
    event("?", "a text frame that is not JSON");
    return;
  }
  const type = typeof msg.type === "string" ? msg.type : "?";
  const now = performance.now();
  if (type === "interim") {
    byId("interim").textContent = String(msg.text ?? "");
    event(type, String(msg.text ?? ""));
  } else if (type === "transcript") {
    const role = msg.role === "agent" ? "agent" : "caller";
    const t = (now - c.opened) / 1000;
    c.transcript = [...(c.transcript || []), { role, text: String(msg.text ?? ""), t }];
    transcriptItems(byId("transcript"), c.transcript);
    if (role === "caller") {
      byId("interim").textContent = "";
      c.turn = { n: c.turns.length + 1, heard: now };
      c.turns.push(c.turn);
      showTurn(c, c.turn);
    }
    event(type, `${role}: ${msg.text ?? ""}`);
  } else if (type === "turn_start") {
    if (c.turn && c.turn.started === undefined) c.turn.started = now;
    if (c.turn) showTurn(c, c.turn);
    event(type);
  } else if (type === "audio_start") {
    if (c.turn && c.turn.audioStart === undefined) c.turn.audioStart = now;
    if (c.turn) showTurn(c, c.turn);
    event(type);
  } else if (type === "audio_end") {
    c.player.port.postMessage(msg.interrupted ? "clear" : "flush");
    if (c.turn && c.turn.audioStart !== undefined) c.turn = null; // the reply was heard; the next bytes are not its
    event(type, msg.interrupted ? "interrupted" : "");
  } else {
    event(type, JSON.stringify(msg).slice(0, 200));
  }
}

function showTurn(c, turn) {
  const body = byId("turns").tBodies[0];
  const gap = (a, b) => (a === undefined || b === undefined ? undefined : (b - a) / 1000);
  const row = h("tr", { dataset: { turn: String(turn.n) } }, h("td", {}, String(turn.n)),
    h("td", {}, ms(gap(turn.heard, turn.started))), h("td", {}, ms(gap(turn.started, turn.audioStart))),
    h("td", {}, ms(gap(turn.heard, turn.firstAudio))));
  const old = body.querySelector(`tr[data-turn="${turn.n}"]`);
  if (old) old.replaceWith(row);
  else body.append(row);
}

function hangUp() {
  if (!call) return;
  call.closing = true;
  if (call.ws && call.ws.readyState <= WebSocket.OPEN) call.ws.close(1000, "hang up");
}

function endCall() {
  if (call && call.ws && call.ws.readyState === WebSocket.OPEN) {
    call.ws.send(JSON.stringify({ type: "end_call" }));
    event("end_call", "sent");
  }
}

function finish(c, text) {
  if (c.finished) return;
  c.finished = true;
  status("closed", text);
  if (c.mic) {
    c.mic.port.postMessage("stop");
    c.source.disconnect();
  }
  for (const track of c.stream ? c.stream.getTracks() : []) track.stop();
  if (c.player) c.player.port.postMessage("flush");
  // let the agent's last words play out, then let the audio go
  const left = c.closing || !c.queued ? 200 : Math.min(10000, (c.queued / 16) + 300);
  setTimeout(() => c.context.close().catch(() => {}), left);
  if (call === c) call = null;
  if (c.prefix) showRecord(c.prefix, 0);
}

// After the call: the record the daemon wrote (found by the key's prefix).
async function showRecord(prefix, attempt) {
  let found;
  try {
    const data = await api("calls?limit=20");
    found = (data.calls || []).find((r) => r.key_prefix === prefix && r.state !== "active");
  } catch (e) {
    return;
  }
  if (!found) {
    if (attempt < 20) setTimeout(() => showRecord(prefix, attempt + 1), 500);
    return;
  }
  const body = clear(byId("call-result-body"));
  const link = h("a", { href: `#call=${encodeURIComponent(found.call_id)}`, class: "open-call" }, `Open call ${found.call_id} in History`);
  const table = h("table", { class: "latency" }, h("thead"), h("tbody"));
  latencyTable(table, (found.metadata || {}).latencies);
  body.append(h("p", {}, `${found.duration ?? "-"} s, ${found.turns ?? 0} turns, end: ${found.end_reason ?? "-"}, `
    + `${found.points_charged ?? 0} points. `, link), table);
  byId("call-result").hidden = false;
}

export function setUpCall() {
  byId("call-form").addEventListener("submit", start);
  byId("hangup").addEventListener("click", hangUp);
  byId("endcall").addEventListener("click", endCall);
  status("idle", "Idle");
}
