// The UpVoot console page: logging in, and the three views (Call, Live
// calls, History).
//
// Login: `upvoot console-url` prints .../console/#token=<operator token>.
// The page takes the token from the fragment, removes it from the address
// bar (history.replaceState) before anything else, and exchanges it for a
// session cookie (POST api/login -> {"csrf"}); a later visit asks
// GET api/session. The CSRF token goes with every POST (util.js).
//
// Views are sections of index.html; #call=<id> opens a call in History.

import { api, byId, notice, session } from "./util.js";
import { loadAgents, setUpCall } from "./call.js";
import { hideLive, showLive } from "./live.js";
import { openCall, search, setUpHistory } from "./history.js";

const VIEWS = ["call", "live", "history"];
let current = null;

function show(view) {
  if (current === view) return;
  current = view;
  for (const name of VIEWS) {
    byId(`view-${name}`).hidden = name !== view;
    byId(`nav-${name}`).classList.toggle("active", name === view);
  }
  if (view === "live") showLive();
  else hideLive();
  if (view === "history") search();
}

function loggedOut(message) {
  session.csrf = null;
  hideLive();
  current = null;
  byId("nav").hidden = true;
  for (const name of VIEWS) byId(`view-${name}`).hidden = true;
  byId("login").hidden = false;
  if (message) notice(message, "error");
}

async function loggedIn(csrf) {
  session.csrf = csrf;
  byId("login").hidden = true;
  byId("nav").hidden = false;
  document.body.dataset.session = "yes";
  try {
    await loadAgents();
  } catch (e) {
    notice(`Could not load the agents: ${e.message}`, "error");
  }
  route();
}

function route() {
  const m = /^#call=(.+)$/.exec(location.hash);
  if (m) {
    show("history");
    openCall(decodeURIComponent(m[1]));
  } else if (!current) {
    show("call");
  }
}

async function logIn(token) {
  try {
    const data = await api("login", { method: "POST", body: { token } });
    await loggedIn(data.csrf);
  } catch (e) {
    loggedOut(e.status === 401 || e.status === 403 ? "That token was not accepted." : `Could not log in: ${e.message}`);
  }
}

async function start() {
  session.onUnauthorized = () => loggedOut("The session has ended: log in again.");
  setUpCall();
  setUpHistory();
  for (const name of VIEWS) byId(`nav-${name}`).addEventListener("click", () => show(name));
  byId("logout").addEventListener("click", async () => {
    try {
      await api("logout", { method: "POST" });
    } catch (e) {
      // logged out either way
    }
    loggedOut("");
  });
  byId("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = byId("token");
    const token = input.value.trim();
    input.value = "";
    logIn(token);
  });
  window.addEventListener("hashchange", () => { if (session.csrf) route(); });

  const m = /^#token=([^&]+)/.exec(location.hash);
  if (m) {
    // the token must not stay in the address bar, the history or a bookmark
    history.replaceState(null, "", location.pathname + location.search);
    await logIn(decodeURIComponent(m[1]));
    return;
  }
  try {
    const data = await api("session");
    await loggedIn(data.csrf);
  } catch (e) {
    loggedOut(e.status === 401 ? "" : `The console is not reachable: ${e.message}`);
  }
}

start();
