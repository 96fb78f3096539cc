// The console's small helpers: the API client and a DOM builder.
//
// Text from calls (transcripts, names, metadata) only ever reaches the page
// as text nodes (textContent); nothing here writes HTML.

export const session = { csrf: null, onUnauthorized: null };

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// fetch() the console API (paths relative to /console/). A body is sent as
// JSON; every request but GET carries the CSRF token.
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  const response = await fetch("api/" + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  if (response.status === 401 && path !== "login" && path !== "session" && session.onUnauthorized) {
    session.onUnauthorized();
  }
  if (!response.ok) {
    let why = response.statusText;
    try {
      const data = await response.json();
      why = data.error || data.message || why;
    } catch (e) {
      // not JSON: keep the status text
    }
    throw new ApiError(response.status, `${response.status} ${why}`);
  }
  return response.json();
}

// h("li", {class: "x", dataset: {role: "agent"}}, "text", child) -> element.
// Strings become text nodes; attributes are set by name (never "style" or
// an event handler: the CSP forbids inline ones anyway).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "class") el.className = value;
    else if (name.startsWith("on") || name === "style") throw new Error(`h(): no ${name} attribute`);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

export function byId(id) {
  return document.getElementById(id);
}

export function seconds(value, digits = 1) {
  return typeof value === "number" && isFinite(value) ? `${value.toFixed(digits)} s` : "-";
}

export function ms(value) {
  return typeof value === "number" && isFinite(value) ? `${Math.round(value * 1000)} ms` : "-";
}

export function when(epochSeconds) {
  if (typeof epochSeconds !== "number" || !isFinite(epochSeconds)) return "-";
  return new Date(epochSeconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

let noticeTimer = null;

// A one-line message at the top of the page (errors, hints).
export function notice(text, kind = "info") {
  const el = byId("notice");
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = !text;
  clearTimeout(noticeTimer);
  if (text && kind === "info") noticeTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

// The latency stages of a call record's turn, with the names of older records.
export const STAGES = ["end_of_turn", "turn_model", "transcription", "brain_first_token", "first_audio"];
export const STAGE_NAMES = {
  end_of_turn: "end of turn", turn_model: "turn model", transcription: "transcription",
  brain_first_token: "brain", first_audio: "first audio", voice_to_voice: "voice to voice",
};
const OLD_KEYS = { endpointing: "end_of_turn", first_token: "brain_first_token" };

export function readLatency(turn) {
  const out = {};
  for (const [k, v] of Object.entries(turn || {})) out[OLD_KEYS[k] || k] = v;
  return out;
}

// A table of per-turn latency splits (a call record's metadata.latencies).
export function latencyTable(table, latencies) {
  const head = h("tr", {}, h("th", {}, "turn"),
    ...STAGES.map((s) => h("th", {}, STAGE_NAMES[s])), h("th", {}, STAGE_NAMES.voice_to_voice));
  clear(table.tHead || table.createTHead()).append(head);
  const body = clear(table.tBodies[0] || table.createTBody());
  (latencies || []).forEach((raw, i) => {
    const turn = readLatency(raw);
    body.append(h("tr", {}, h("td", {}, String(i + 1)),
      ...STAGES.map((s) => h("td", {}, ms(turn[s]))), h("td", {}, ms(turn.voice_to_voice))));
  });
}

// A transcript as list items: "12.3 s  caller: text".
export function transcriptItems(list, transcript) {
  clear(list);
  for (const entry of transcript || []) {
    const role = entry.role === "agent" || entry.role === "caller" ? entry.role : "other";
    list.append(h("li", { class: `said ${role}`, dataset: { role } },
      h("span", { class: "t" }, seconds(entry.t)),
      h("span", { class: "who" }, String(entry.role ?? "?")),
      h("span", { class: "text" }, String(entry.text ?? "")),
      entry.interrupted ? h("span", { class: "muted" }, " (interrupted)") : null));
  }
}
