// corral's fleet dashboard: plain JavaScript, no build step, no outside requests.
//
// Every call sends the management token as `Authorization: Bearer`; the token comes
// from the login form or the URL fragment (#token=...), lives in this tab's
// sessionStorage, and is removed from the address bar at once. Live data arrives on
// one server-sent event stream (/api/v1/dashboard/stream), read with fetch() so that
// it can carry the header. Data is written into the page with textContent only.
"use strict";

const TOKEN_KEY = "corral.managementToken";
const state = {
  token: null,
  fleet: null,
  traffic: null,
  selected: null, // instance id shown in the detail panel
  stream: null, // AbortController of the live stream
  logStream: null, // AbortController of the log tail
  logFor: null,
  retry: 0,
};

const $ = (id) => document.getElementById(id);

class AuthError extends Error {}

// -- helpers ----------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fmtSeconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  return `${value.toFixed(value < 10 ? 2 : 1)} s`;
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "–";
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function fmtBytes(size) {
  if (!size) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function firstLine(text) {
  const lines = String(text || "").split("\n").filter((line) => line.trim());
  if (!lines.length) return "";
  return lines.length === 1 ? lines[0] : `${lines[0]} … ${lines[lines.length - 1].trim()}`;
}

function toast(message, bad) {
  const node = el("div", { class: bad ? "toast bad" : "toast", role: "status" }, message);
  $("toasts").append(node);
  setTimeout(() => node.remove(), bad ? 9000 : 4000);
}

function instancePath(id) {
  const [agent, ...rest] = id.split("/");
  return `/api/v1/instances/${encodeURIComponent(agent)}/${encodeURIComponent(rest.join("/"))}`;
}

// -- API ----------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    signOut("The management token was refused.");
    throw new AuthError("token refused");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (error) {
    data = null;
  }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || `HTTP ${response.status}`;
    throw new Error(message);
  }
  return data;
}

// Read a server-sent event stream with fetch (EventSource cannot send headers).
async function readEvents(path, signal, onEvent) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${state.token}` },
    signal,
  });
  if (response.status === 401) throw new AuthError("token refused");
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const raw = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message";
      const data = [];
      for (const line of raw.split("\n")) {
        if (line.startsWith(":")) continue;
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(kind, data.join("\n"));
    }
  }
}

// -- sign in and out ----------------------------------------------------------------

function takeTokenFromFragment() {
  const match = /(?:^#|&)token=([^&]*)/.exec(window.location.hash);
  if (!match) return null;
  history.replaceState(null, "", window.location.pathname + window.location.search);
  return decodeURIComponent(match[1]);
}

function signIn(token) {
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("login-error").textContent = "";
  $("logout").hidden = false;
  connect();
}

function signOut(reason) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.stream) state.stream.abort();
  stopLog();
  state.stream = null;
  $("board").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = reason || "";
  setConnection("off", "not connected");
}

function setConnection(kind, text) {
  const node = $("connection");
  node.className = `pill ${kind}`;
  node.dataset.state = kind;
  node.textContent = text;
}

// -- the live stream ----------------------------------------------------------------

async function connect() {
  if (state.stream) state.stream.abort();
  const controller = new AbortController();
  state.stream = controller;
  setConnection("starting", "connecting");
  try {
    await readEvents("/api/v1/dashboard/stream", controller.signal, (kind, data) => {
      if (controller !== state.stream) return;
      state.retry = 0;
      setConnection("ok", "live");
      $("board").hidden = false;
      if (kind === "fleet") {
        state.fleet = JSON.parse(data);
        render();
      } else if (kind === "traffic") {
        state.traffic = JSON.parse(data);
        renderModels();
      }
    });
  } catch (error) {
    if (error instanceof AuthError) {
      signOut("The management token was refused.");
      return;
    }
    if (controller.signal.aborted) return;
  }
  if (controller !== state.stream || !state.token) return;
  // the stream ended (balancer restarting, network): try again, backing off
  state.retry = Math.min(state.retry + 1, 5);
  const wait = 500 * 2 ** (state.retry - 1);
  setConnection("off", `reconnecting in ${Math.round(wait / 100) / 10} s`);
  setTimeout(() => {
    if (controller === state.stream && state.token) connect();
  }, wait);
}

// -- rendering ----------------------------------------------------------------------

function replaceRows(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

function render() {
  const fleet = state.fleet;
  if (!fleet) return;
  $("version").textContent = `v${fleet.version}`;
  const buffered = Object.values(fleet.buffered || {}).reduce((a, b) => a + b, 0);
  $("counts").textContent =
    `${fleet.agents.length} agent(s) · ${fleet.instances.length} instance(s) · ` +
    `${buffered} buffered`;
  renderInstances();
  renderModels();
  renderCatalog();
  renderHosts();
  renderAgents();
  renderDetail();
}

function slotsCell(instance) {
  const total = instance.slots_total || 0;
  const busy = instance.slots_busy || 0;
  const fill = el("span");
  fill.style.width = `${total ? Math.round((100 * busy) / total) : 0}%`;
  const bar = el("div", { class: total && busy >= total ? "bar full" : "bar" }, fill);
  return el("td", {}, el("div", { class: "slots" }, bar, el("span", { class: "num" }, `${busy}/${total}`)));
}

function instanceState(instance) {
  if (instance.stale) return "stale";
  if (instance.draining) return "draining";
  return instance.state;
}

function lastError(instance) {
  const supervisor = instance.supervisor || {};
  if (instance.issues && instance.issues.length) {
    const issue = instance.issues[instance.issues.length - 1];
    return `${issue.kind}: ${firstLine(issue.message)}`;
  }
  return firstLine(supervisor.last_error);
}

function devicesText(instance) {
  // what the server's binary can use (its --list-devices): "cpu" when it lists none
  if (!instance.supervisor) return "–";
  const devices = instance.supervisor.devices || [];
  if (!devices.length) return "cpu";
  const gib = (mib) => (mib / 1024).toFixed(1);
  return devices
    .map((d) => `${d.name} (${d.description}, ${gib(d.free_mib)} of ${gib(d.total_mib)} GiB free)`)
    .join("; ");
}

function renderInstances() {
  const fleet = state.fleet;
  const instances = [...fleet.instances].sort((a, b) =>
    a.model === b.model ? a.id.localeCompare(b.id) : a.model.localeCompare(b.model),
  );
  const rows = instances.map((instance) => {
    const supervisor = instance.supervisor || {};
    const since = supervisor.ready_since || (instance.supervisor ? null : instance.seen_since);
    const kind = instanceState(instance);
    return el(
      "tr",
      {
        dataset: { instance: instance.id, model: instance.model },
        class: instance.id === state.selected ? "selected" : "",
      },
      el("td", {}, instance.model || "(none)"),
      el("td", {}, el("span", { class: `pill ${kind}` }, kind)),
      el("td", {}, instance.url),
      slotsCell(instance),
      el("td", { class: "num" }, instance.in_flight),
      el("td", { class: "num" }, since ? fmtDuration(fleet.time - since) : "–"),
      el("td", { class: "num" }, supervisor.restarts ?? "–"),
      el("td", { class: "wrap" }, devicesText(instance)),
      el("td", { class: "wrap error" }, lastError(instance)),
      el(
        "td",
        {},
        el("button", { type: "button", class: "secondary", onclick: () => select(instance.id) }, "Details"),
      ),
    );
  });
  replaceRows($("instances"), rows);
  $("instances-empty").hidden = rows.length > 0;
}

function spark(series) {
  const width = 150;
  const height = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const most = Math.max(1, ...series.map((point) => point.requests));
  const step = width / Math.max(1, series.length);
  series.forEach((point, index) => {
    for (const [value, cls] of [
      [point.requests, ""],
      [point.errors, "err"],
    ]) {
      if (!value) continue;
      const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const h = Math.max(1, (height * value) / most);
      rect.setAttribute("x", (index * step).toFixed(1));
      rect.setAttribute("y", (height - h).toFixed(1));
      rect.setAttribute("width", Math.max(1, step - 1).toFixed(1));
      rect.setAttribute("height", h.toFixed(1));
      if (cls) rect.setAttribute("class", cls);
      svg.append(rect);
    }
  });
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = `requests per ${state.traffic ? state.traffic.bucket_seconds : 10} s`;
  svg.append(title);
  return svg;
}

function renderModels() {
  const fleet = state.fleet;
  if (!fleet) return;
  const traffic = (state.traffic && state.traffic.models) || {};
  if (state.traffic) $("window").textContent = `${Math.round(state.traffic.window_seconds / 60)} minutes`;
  const names = new Set([...fleet.models, ...Object.keys(fleet.buffered || {}), ...Object.keys(traffic)]);
  const rows = [...names].sort().map((model) => {
    const pool = fleet.instances.filter((i) => i.model === model || (i.aliases || []).includes(model));
    const busy = pool.reduce((sum, i) => sum + (i.slots_busy || 0), 0);
    const total = pool.reduce((sum, i) => sum + (i.slots_total || 0), 0);
    const t = traffic[model];
    return el(
      "tr",
      { dataset: { model } },
      el("td", {}, model),
      el("td", { class: "num" }, pool.length),
      el("td", { class: "num" }, `${busy}/${total}`),
      el("td", { class: "num" }, (fleet.buffered || {})[model] || 0),
      el("td", { class: "num" }, t ? t.rate.toFixed(2) : "0.00"),
      el("td", { class: "num" }, t ? t.requests : 0),
      el("td", { class: t && t.errors ? "num error" : "num" }, t ? t.errors : 0),
      el("td", { class: "num" }, fmtSeconds(t && t.p50)),
      el("td", { class: "num" }, fmtSeconds(t && t.p95)),
      el("td", { class: "num" }, fmtSeconds(t && t.ttft_p50)),
      el("td", {}, t ? spark(t.series) : ""),
    );
  });
  replaceRows($("models"), rows);
  $("models-empty").hidden = rows.length > 0;
}

function renderCatalog() {
  const catalog = state.fleet.catalog;
  $("catalog-card").hidden = !catalog;
  if (!catalog) return;
  const rows = catalog.map((model) => {
    const loaded = model.state === "loaded" || model.state === "loading";
    const action = loaded ? "unload" : "load";
    return el(
      "tr",
      { dataset: { catalog: model.id } },
      el("td", {}, model.id, model.unlisted ? el("span", { class: "muted" }, " (unlisted)") : null),
      el("td", {}, el("span", { class: `pill ${model.state}` }, model.state)),
      // where it runs (this machine is "local"); the title lists the hosts that can start it
      el(
        "td",
        { class: "host", title: `can start it: ${(model.hosts || []).join(", ") || "none"}` },
        model.running_on || "–",
      ),
      el("td", { class: "num" }, fmtBytes(model.size_bytes)),
      el("td", {}, model.quantization || "–"),
      el("td", { class: "num" }, model.context_length || "–"),
      el("td", {}, model.group || "–"),
      el("td", { class: "wrap error" }, firstLine(model.error)),
      el(
        "td",
        {},
        el(
          "button",
          {
            type: "button",
            class: loaded ? "secondary" : "",
            onclick: (event) => modelAction(event.target, model.id, action),
          },
          loaded ? "Unload" : "Load",
        ),
      ),
    );
  });
  replaceRows($("catalog"), rows);
}

function renderHosts() {
  const hosts = state.fleet.hosts;
  $("hosts-card").hidden = !hosts;
  if (!hosts) return;
  const rows = hosts.map((host) =>
    el(
      "tr",
      { dataset: { host: host.id } },
      el("td", {}, host.id === "local" ? `${host.name} (this one)` : host.name),
      el(
        "td",
        { class: "num" },
        `${fmtBytes(host.memory_available)} of ${fmtBytes(host.memory_total)}`,
      ),
      el("td", { class: "num servers" }, `${host.servers.length}/${host.max_instances}`),
      el(
        "td",
        { class: "wrap running" },
        host.servers.map((server) => `${server.key} (${server.state})`).join(", ") || "–",
      ),
      el("td", { class: "wrap" }, host.models.join(", ") || "–"),
      el(
        "td",
        { class: "wrap" },
        host.devices.map((d) => `${d.name} (${d.free_mib} of ${d.total_mib} MiB free)`).join("; ") ||
          "cpu",
      ),
    ),
  );
  replaceRows($("hosts"), rows);
}

function renderAgents() {
  const fleet = state.fleet;
  const rows = fleet.agents.map((agent) =>
    el(
      "tr",
      { dataset: { agent: agent.id } },
      el("td", {}, agent.name),
      el("td", {}, agent.id),
      el("td", {}, agent.remote || "–"),
      el("td", { class: "num" }, fmtDuration(fleet.time - agent.connected_at)),
      el("td", { class: "num" }, agent.instances.length),
    ),
  );
  replaceRows($("agents"), rows);
  $("agents-empty").hidden = rows.length > 0;
}

// -- actions ------------------------------------------------------------------------

async function modelAction(button, model, action) {
  button.disabled = true;
  try {
    await api("POST", `/api/v1/models/${encodeURIComponent(model)}/${action}`);
    toast(`${action === "load" ? "Loading" : "Unloaded"} ${model}`);
  } catch (error) {
    if (!(error instanceof AuthError)) toast(`${action} ${model}: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

function select(instanceId) {
  state.selected = instanceId;
  $("detail").hidden = false;
  $("detail-id").textContent = instanceId;
  $("reconfigure-args").value = "";
  $("reconfigure-port").value = "";
  renderInstances();
  renderDetail();
  startLog(instanceId);
  $("detail").scrollIntoView({ block: "nearest" });
}

function renderDetail() {
  if (!state.selected || !state.fleet) return;
  const present = state.fleet.instances.some((i) => i.id === state.selected);
  $("detail-gone").hidden = present;
  $("restart").disabled = !present;
}

function closeDetail() {
  state.selected = null;
  $("detail").hidden = true;
  stopLog();
  renderInstances();
}

function stopLog() {
  if (state.logStream) state.logStream.abort();
  state.logStream = null;
  state.logFor = null;
}

async function startLog(instanceId) {
  stopLog();
  const log = $("log");
  log.textContent = "";
  const controller = new AbortController();
  state.logStream = controller;
  state.logFor = instanceId;
  const lines = [];
  try {
    await readEvents(`${instancePath(instanceId)}/logs?lines=200&follow=1`, controller.signal, (kind, data) => {
      if (kind !== "message") return;
      lines.push(JSON.parse(data));
      if (lines.length > 1000) lines.splice(0, lines.length - 1000);
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = lines.join("\n");
      if (atEnd) log.scrollTop = log.scrollHeight;
    });
  } catch (error) {
    if (controller.signal.aborted) return;
    if (error instanceof AuthError) {
      signOut("The management token was refused.");
      return;
    }
    lines.push(`(log unavailable: ${error.message})`);
    log.textContent = lines.join("\n");
  }
}

async function restartSelected() {
  const id = state.selected;
  const button = $("restart");
  button.disabled = true;
  toast(`Draining and restarting ${id}…`);
  try {
    const result = await api("POST", `${instancePath(id)}/restart`);
    toast(`Restarting ${id}${result.drained ? "" : " (drain timed out)"}`);
  } catch (error) {
    if (!(error instanceof AuthError)) toast(`restart ${id}: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

// Split an argument line like a shell would for simple cases: spaces separate,
// quotes group, no expansion of any kind.
function splitArgs(line) {
  const args = [];
  const pattern = /"([^"]*)"|'([^']*)'|(\S+)/g;
  let match;
  while ((match = pattern.exec(line)) !== null) {
    args.push(match[1] ?? match[2] ?? match[3]);
  }
  return args;
}

async function reconfigureSelected(event) {
  event.preventDefault();
  const id = state.selected;
  const body = {};
  const args = $("reconfigure-args").value.trim();
  const port = $("reconfigure-port").value.trim();
  if (args) body.args = splitArgs(args);
  if (port) body.port = Number(port);
  if (!args && !port) {
    toast("Give llama-server arguments, a port, or both.", true);
    return;
  }
  toast(`Draining and reconfiguring ${id}…`);
  try {
    await api("POST", `${instancePath(id)}/reconfigure`, body);
    toast(`Reconfigured ${id}; it restarts with the new settings`);
  } catch (error) {
    if (!(error instanceof AuthError)) toast(`reconfigure ${id}: ${error.message}`, true);
  }
}

// -- start ----------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    $("token").value = "";
    if (token) signIn(token);
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("restart").addEventListener("click", restartSelected);
  $("reconfigure").addEventListener("submit", reconfigureSelected);
  $("detail-close").addEventListener("click", closeDetail);
  const token = takeTokenFromFragment() || sessionStorage.getItem(TOKEN_KEY);
  if (token) signIn(token);
  else signOut("");
});
