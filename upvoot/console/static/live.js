// Live calls: the daemon's active calls, pushed as server-sent events
// (GET api/live, "event: calls", data: a JSON list), kept open while the
// view is shown. Durations tick locally between updates.

import { byId, clear, h } from "./util.js";

let source = null;
let calls = [];
let received = 0;
let ticker = null;

function duration(c) {
  const base = typeof c.duration === "number" ? c.duration : 0;
  return base + (performance.now() - received) / 1000;
}

function render() {
  const body = clear(byId("live-table").tBodies[0]);
  for (const c of calls) {
    body.append(h("tr", { dataset: { callId: String(c.call_id ?? "") } },
      h("td", {}, String(c.call_id ?? "")), h("td", {}, String(c.agent ?? "")),
      h("td", {}, String(c.account ?? "")), h("td", {}, String(c.provider ?? "")),
      h("td", {}, String(c.state ?? "")), h("td", { class: "num" }, `${duration(c).toFixed(0)} s`),
      h("td", { class: "num" }, String(c.turns ?? 0)),
      h("td", {}, c.key_prefix ? `${c.key_prefix}…` : "")));
  }
  byId("live-empty").hidden = calls.length > 0;
}

export function showLive() {
  if (source) return;
  const state = byId("live-state");
  state.textContent = "(connecting)";
  source = new EventSource("api/live", { withCredentials: true });
  source.addEventListener("open", () => { state.textContent = "(live)"; });
  source.addEventListener("error", () => { state.textContent = "(reconnecting)"; });
  source.addEventListener("calls", (e) => {
    try {
      const data = JSON.parse(e.data);
      calls = Array.isArray(data) ? data : data.calls || [];
    } catch (err) {
      return;
    }
    received = performance.now();
    state.textContent = "(live)";
    render();
  });
  ticker = setInterval(render, 1000);
}

export function hideLive() {
  if (source) source.close();
  source = null;
  clearInterval(ticker);
  ticker = null;
}
