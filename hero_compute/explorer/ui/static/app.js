// The hero_compute dashboard: the fleet for viewers, and VM actions for operators,
// through the explorer's JSON-RPC methods on this listener's POST /rpc (every call with
// the session's CSRF token).  No framework, no build step: every value from the wire
// goes into the page through textContent, never as HTML.

const POLL_MS = 2000;

const SVG_NS = "http://www.w3.org/2000/svg";

import { KEY_ITEM, closeConsole, initConsole, openConsole, sessionKey, wsProtocols } from "./console.js";

const $ = (id) => document.getElementById(id);

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
// The login redirect's fragment (#k=...) carries the session's key, once: kept for this
// tab, and out of the address bar and the history.
const fromLogin = /^#k=([\w.-]+)$/.exec(location.hash);
if (fromLogin) {
  sessionStorage.setItem(KEY_ITEM, fromLogin[1]);
  history.replaceState(null, "", location.pathname + location.search);
}
// Who we are: the server wrote the role into the page.  An operator's controls are only
// shown here; the server refuses a viewer's writes whatever the page does.
const CSRF = sessionKey();
// CONTRACT §11: the page has the token in <meta name="csrf-token">.  The page served for
// a cookie carries it empty (a cookie reaches every port of the host, the token must
// not); the tab's copy goes there for scripts that read it.
document.querySelector('meta[name="csrf-token"]')?.setAttribute("content", CSRF);
const OPERATOR = meta("ui-role") === "operator";

let rpcId = 0;
class RpcError extends Error {
  constructor(error) {
    super(error.message);
    this.code = error.code;
  }
}

async function rpc(method, params, signal) {
  const response = await fetch("/rpc", {
    method: "POST",
    headers: { "content-type": "application/json", "x-csrf-token": CSRF },
    credentials: "same-origin",
    signal,
    body: JSON.stringify({ jsonrpc: "2.0", id: ++rpcId, method, params: params || {} }),
  });
  if (response.status === 401) {
    throw new RpcError({ code: 401, message: "session expired: open the token URL again" });
  }
  if (response.status === 403) {
    // This tab lacks the key its login handed out (an address copied to a new tab).
    throw new RpcError({ code: 403, message: "this tab has no session key: open the token URL again" });
  }
  const answer = await response.json();
  if (answer.error) throw new RpcError(answer.error);
  return answer.result;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function ago(seconds) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function mb(v) {
  return v >= 1024 ? `${(v / 1024).toFixed(1)} GiB` : `${v} MiB`;
}

function fill(barSpan, used, total) {
  const ratio = total > 0 ? Math.min(1, used / total) : 0;
  barSpan.style.width = `${(ratio * 100).toFixed(1)}%`;
  barSpan.parentElement.classList.toggle("high", ratio >= 0.9);
}

function bar(used, total) {
  const span = el("span");
  const outer = el("div", { class: "bar", "aria-hidden": "true" }, span);
  fill(span, used, total);
  return outer;
}

// Status is never colour alone: an icon of its own shape and the word.
function statusCell(node) {
  const online = node.status === "online";
  return el(
    "span",
    { class: `status ${node.status}` },
    el("span", { class: "icon", "aria-hidden": "true" }, online ? "●" : "✕"),
    node.status,
    el("span", { class: "seen" }, `last seen ${ago(node.last_seen)}`),
  );
}

function usageCell(node) {
  const cap = node.capacity || {};
  const use = node.usage || {};
  const rows = [
    ["vCPU", use.vcpus || 0, cap.vcpus || 0, (v) => v],
    ["Memory", use.memory_mb || 0, cap.memory_mb || 0, mb],
    ["Disk", use.disk_gb || 0, cap.disk_gb || 0, (v) => `${v} GB`],
  ];
  // Usage is what every defined VM reserves; capacity what VMs may reserve in all
  // (the node's NODE_CAPACITY cap, else the host's).
  const grid = el("div", { class: "use", title: "reserved by defined VMs / capacity (NODE_CAPACITY, else the host's)" });
  for (const [name, used, total, fmt] of rows) {
    grid.append(el("span", {}, name), bar(used, total), el("span", {}, `${fmt(used)} / ${fmt(total)}`));
  }
  return grid;
}

function capacityText(cap) {
  if (!cap || !Object.keys(cap).length) return "—";
  return `${cap.vcpus ?? "?"} vCPU, ${mb(cap.memory_mb ?? 0)} memory, ${cap.disk_gb ?? "?"} GB disk (what VMs may reserve)`;
}

function labelTags(labels) {
  const cell = el("span");
  for (const [k, v] of Object.entries(labels || {})) cell.append(el("span", { class: "tag" }, `${k}=${v}`));
  return cell;
}

// The gaps between a node's last heartbeats, as an inline SVG line (higher is slower).
function sparkline(times) {
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  if (gaps.length < 2) return "not enough heartbeats yet";
  const [w, h, pad] = [240, 36, 3];
  const min = Math.min(...gaps);
  const max = Math.max(...gaps);
  const points = gaps.map((gap, i) => {
    const x = pad + (i * (w - 2 * pad)) / (gaps.length - 1);
    const y = h - pad - ((gap - min) * (h - 2 * pad)) / (max - min || 1);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const svg = document.createElementNS(SVG_NS, "svg");
  const words = `${gaps.length} gaps between heartbeats, from ${min.toFixed(2)} s to ${max.toFixed(2)} s`;
  for (const [key, value] of Object.entries({ class: "sparkline", viewBox: `0 0 ${w} ${h}`, width: w, height: h, role: "img", "aria-label": words })) {
    svg.setAttribute(key, value);
  }
  const line = document.createElementNS(SVG_NS, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return el("span", { class: "spark" }, svg, el("span", { class: "seen" }, `last gap ${gaps[gaps.length - 1].toFixed(2)} s; ${words}`));
}

// ---- state -------------------------------------------------------------------------

const state = {
  cursors: [null], // cursor of each page seen so far; the last is the current page's
  next: null,
  sort: { key: "node_id", dir: 1 },
  timer: null,
  updates: 0,
  generation: 0, // of the latest update begun: an older one still running shows nothing
  abort: null, // the AbortController of the latest update's summary
  pendingAction: null, // performance.now() of a user action waiting for its render
};

function filters() {
  const labels = {};
  const text = $("f-label").value.trim();
  if (text) {
    for (const part of text.split(",")) {
      const i = part.indexOf("=");
      if (i < 1) throw new RpcError({ code: 0, message: `label filter "${part}" is not key=value` });
      labels[part.slice(0, i).trim()] = part.slice(i + 1).trim();
    }
  }
  const query = { limit: Number($("f-limit").value) };
  if ($("f-status").value) query.status = $("f-status").value;
  if (Object.keys(labels).length) query.labels = labels;
  return query;
}

// ---- the fleet view ----------------------------------------------------------------

async function loadSummary(signal) {
  // One call: the explorer keeps the sums as heartbeats arrive (explorer.summary).
  const sum = await rpc("explorer.summary", {}, signal);
  const totals = { online: sum.nodes.online, offline: sum.nodes.offline, vms: sum.vms, cap: sum.capacity, use: sum.usage };
  $("s-online").textContent = totals.online;
  $("s-offline").textContent = totals.offline;
  $("s-vms").textContent = totals.vms;
  $("s-vcpus").textContent = `${totals.use.vcpus} of ${totals.cap.vcpus}`;
  $("s-memory").textContent = `${mb(totals.use.memory_mb)} of ${mb(totals.cap.memory_mb)}`;
  $("s-disk").textContent = `${totals.use.disk_gb} GB of ${totals.cap.disk_gb} GB`;
  fill($("b-vcpus"), totals.use.vcpus, totals.cap.vcpus);
  fill($("b-memory"), totals.use.memory_mb, totals.cap.memory_mb);
  fill($("b-disk"), totals.use.disk_gb, totals.cap.disk_gb);
}

const HEADINGS = ["Name", "Id", "Status", "Transport", "Address", "Labels", "VMs", "Usage"];

function nodeRow(node) {
  const cells = [
    el("a", { href: `#/node/${encodeURIComponent(node.node_id)}` }, node.name || node.node_id),
    el("span", { class: "mono" }, node.node_id),
    statusCell(node),
    node.transport,
    el("span", { class: "mono" }, node.socket_path),
    labelTags(node.labels),
    node.vm_count,
    usageCell(node),
  ];
  const row = el("tr", { class: node.status, "data-node-id": node.node_id });
  cells.forEach((cell, i) => row.append(el("td", { "data-th": HEADINGS[i] }, cell)));
  return row;
}

function sortValue(node, key) {
  const v = node[key];
  return typeof v === "number" ? v : String(v ?? "").toLowerCase();
}

async function loadPage(generation) {
  const query = filters();
  const cursor = state.cursors[state.cursors.length - 1];
  if (cursor) query.cursor = cursor;
  const page = await rpc("explorer.query_nodes", query);
  if (generation !== state.generation) return false;
  state.next = page.next_cursor;
  // Text filter and sorting act on the page at hand; status and labels are asked of the
  // explorer, which pages through the whole fleet.
  const text = $("f-text").value.trim().toLowerCase();
  let nodes = page.nodes;
  if (text) {
    nodes = nodes.filter((n) =>
      [n.name, n.node_id, n.socket_path, n.transport, ...Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`)]
        .some((s) => String(s || "").toLowerCase().includes(text)),
    );
  }
  const { key, dir } = state.sort;
  nodes = [...nodes].sort((a, b) => {
    const x = sortValue(a, key);
    const y = sortValue(b, key);
    return x < y ? -dir : x > y ? dir : 0;
  });
  const body = $("nodes-body");
  const rows = nodes.map(nodeRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "8" }, "No nodes match.")));
  body.replaceChildren(...rows);
  const number = state.cursors.length;
  $("page-info").textContent = `Page ${number}: ${nodes.length} node${nodes.length === 1 ? "" : "s"}${text ? ` matching "${text}"` : ""}`;
  $("prev").disabled = $("first").disabled = number === 1;
  $("next").disabled = !state.next;
  return true;
}

// ---- a node's view -----------------------------------------------------------------

async function loadNode(nodeId, generation) {
  const [node, vms, info, history] = await Promise.allSettled([
    rpc("explorer.get_node", { node_id: nodeId }),
    rpc("explorer.call", { node_id: nodeId, method: "vm.list" }),
    rpc("explorer.call", { node_id: nodeId, method: "node.info" }),
    rpc("explorer.node_history", { node_id: nodeId }),
  ]);
  if (generation !== state.generation) return;
  if (node.status === "rejected") throw node.reason;
  const n = node.value;
  $("node-title").textContent = `Node ${n.name || n.node_id}`;
  const facts = [
    ["Id", n.node_id],
    ["Status", statusCell(n)],
    ["Transport", n.transport],
    ["Address", n.socket_path],
    ["Version", n.version],
    ["First seen", new Date(n.first_seen * 1000).toISOString()],
    ["Labels", labelTags(n.labels)],
    ["VMs", n.vm_count],
    ["Capacity", capacityText(n.capacity)],
    ["Usage", usageCell(n)],
    ["Heartbeats", history.status === "rejected" ? `Not available: ${history.reason.message}` : sparkline(history.value.heartbeats)],
  ];
  $("node-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const unavailable = (why, cols) => [el("tr", {}, el("td", { colspan: String(cols) }, `Not available: ${why.message}`))];
  const cols = OPERATOR ? 8 : 7;
  $("create-here").hidden = !OPERATOR;
  $("create-here-link").href = `#/create/${encodeURIComponent(nodeId)}`;
  $("vms-body").replaceChildren(
    ...(vms.status === "rejected"
      ? unavailable(vms.reason, cols)
      : vms.value.length
        ? vms.value.map((vm) => {
            const cells = [vm.name, el("span", { class: "mono" }, vm.vm_id), el("span", { class: "vm-state" }, vm.state), vm.vcpus, mb(vm.memory_mb), `${vm.disk_gb} GB`, vm.image || "—"];
            if (OPERATOR) cells.push(vmActions(nodeId, vm));
            return el("tr", { "data-vm-id": vm.vm_id, "data-state": vm.state }, ...cells.map((c) => el("td", {}, c)));
          })
        : [el("tr", {}, el("td", { colspan: String(cols) }, "No VMs."))]),
  );
  $("explorers-body").replaceChildren(
    ...(info.status === "rejected"
      ? unavailable(info.reason, 4)
      : info.value.explorers.map((e) =>
          el(
            "tr",
            {},
            el("td", { class: "mono" }, e.address),
            el("td", {}, el("span", { class: `status ${e.state === "ok" ? "online" : "offline"}` }, el("span", { class: "icon", "aria-hidden": "true" }, e.state === "ok" ? "●" : "✕"), e.state)),
            el("td", {}, e.last_ok ? ago(e.last_ok) : "never"),
            el("td", {}, e.last_error || "—"),
          ),
        )),
  );
}

// ---- an operator's actions ----------------------------------------------------------

// Says what is under way, then how it ended, in the status line (read out by screen
// readers); the views are refreshed once it is over.
async function perform(what, call) {
  const status = $("action-status");
  status.classList.remove("failed");
  status.textContent = `${what}…`;
  document.body.dataset.action = "running";
  try {
    const result = await call();
    status.textContent = `${what}: done.`;
    document.body.dataset.action = "done";
    return result;
  } catch (error) {
    status.classList.add("failed");
    status.textContent = `${what}: failed: ${error.message}${error.code ? ` (${error.code})` : ""}`;
    document.body.dataset.action = "failed";
    return undefined;
  } finally {
    update();
  }
}

// The answer of the opening still waiting for its "close" event, if any.
let confirmPending = null;

function confirmDialog(text, ok) {
  const dialog = $("confirm");
  // A dialog's "close" event is a queued task: opened again before it ran (Cancel,
  // then at once another Delete), the earlier opening takes its own answer now, and
  // that late event must not answer this one.
  if (confirmPending) confirmPending(!dialog.open && dialog.returnValue === "ok");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = ok;
  return new Promise((resolve) => {
    const settle = (answer) => {
      if (confirmPending !== settle) return;
      confirmPending = null;
      dialog.removeEventListener("close", onClose);
      resolve(answer);
    };
    const onClose = () => {
      if (!dialog.open) settle(dialog.returnValue === "ok");
    };
    confirmPending = settle;
    dialog.addEventListener("close", onClose);
    dialog.returnValue = "";
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

function vmCall(nodeId, method, params) {
  return rpc("explorer.call", { node_id: nodeId, method, params });
}

function vmActions(nodeId, vm) {
  const box = el("span", { class: "actions" });
  const label = (verb) => `${verb} VM ${vm.name}`;
  const button = (text, verb, handler, cls) => {
    const b = el("button", { type: "button", "aria-label": label(verb), "data-action": verb.toLowerCase().replace(" ", "-") }, text);
    if (cls) b.className = cls;
    b.addEventListener("click", handler);
    box.append(b);
  };
  const stopped = vm.state === "stopped" || vm.state === "error";
  const on = vm.state === "running" || vm.state === "starting";
  if (stopped) button("Start", "Start", () => perform(`Starting ${vm.name}`, () => vmCall(nodeId, "vm.start", { vm_id: vm.vm_id })));
  if (on) {
    button("Stop", "Stop", () => perform(`Stopping ${vm.name}`, () => vmCall(nodeId, "vm.stop", { vm_id: vm.vm_id })));
    button("Force stop", "Force stop", () => perform(`Forcing ${vm.name} off`, () => vmCall(nodeId, "vm.stop", { vm_id: vm.vm_id, force: true })), "danger");
  }
  if (stopped) {
    button("Delete", "Delete", async () => {
      if (!(await confirmDialog(`Delete VM ${vm.name} (${vm.vm_id}) and its disk? This cannot be undone.`, "Delete"))) return;
      await perform(`Deleting ${vm.name}`, () => vmCall(nodeId, "vm.delete", { vm_id: vm.vm_id }));
    }, "danger");
  }
  const consoleLink = el("a", { href: `#/console/${encodeURIComponent(nodeId)}/${encodeURIComponent(vm.vm_id)}`, "aria-label": label("Console of"), "data-action": "console" }, "Console");
  box.append(consoleLink);
  return box;
}

// "22, 8080:80, 53/udp" as vm.create's ports.
function parsePorts(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean).map((part) => {
    const m = /^(?:(\d+):)?(\d+)(?:\/(tcp|udp))?$/.exec(part);
    if (!m) throw new RpcError({ code: 0, message: `port "${part}" is not GUEST, HOST:GUEST or GUEST/udp` });
    const port = { guest: Number(m[2]) };
    if (m[1]) port.host = Number(m[1]);
    if (m[3]) port.protocol = m[3];
    return port;
  });
}

function parseLabels(text) {
  const labels = {};
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const i = part.indexOf("=");
    if (i < 1) throw new RpcError({ code: 0, message: `label "${part}" is not key=value` });
    labels[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return labels;
}

async function loadCreate(nodeId) {
  const select = $("c-node");
  const page = await rpc("explorer.query_nodes", { status: "online", limit: 500 });
  const options = [el("option", { value: "" }, "placed by the explorer")];
  for (const n of page.nodes) options.push(el("option", { value: n.node_id }, `${n.name} (${n.node_id})`));
  const keep = nodeId || "";
  select.replaceChildren(...options);
  select.value = page.nodes.some((n) => n.node_id === keep) ? keep : "";
}

async function submitCreate(event) {
  event.preventDefault();
  const form = event.target;
  const v = (name) => form.elements[name].value.trim();
  const params = { name: v("name"), vcpus: Number(v("vcpus")), memory_mb: Number(v("memory_mb")), disk_gb: Number(v("disk_gb")) };
  if (v("image")) params.image = v("image");
  if (v("kernel")) params.boot = { kernel: v("kernel"), ...(v("initrd") ? { initrd: v("initrd") } : {}) };
  const keys = v("ssh_keys").split("\n").map((s) => s.trim()).filter(Boolean);
  if (keys.length) params.ssh_keys = keys;
  const node = v("node");
  $("c-submit").disabled = true;
  try {
    const result = await perform(`Creating ${params.name}`, async () => {
      if (v("ports")) params.ports = parsePorts(v("ports"));
      if (node) return { ...(await vmCall(node, "vm.create", params)), node_id: node };
      const where = parseLabels(v("where"));
      return rpc("explorer.create_vm", { ...params, ...(Object.keys(where).length ? { where } : {}), strategy: v("strategy") });
    });
    if (result) {
      $("action-status").textContent = `Created ${result.name} (${result.vm_id}) on node ${result.node_id}.`;
      location.hash = `#/node/${encodeURIComponent(result.node_id)}`;
    }
  } finally {
    $("c-submit").disabled = false;
  }
}

// ---- the loop ----------------------------------------------------------------------

function route() {
  const hash = location.hash;
  let match = /^#\/node\/(.+)$/.exec(hash);
  if (match) return { view: "node", id: decodeURIComponent(match[1]) };
  match = /^#\/create(?:\/(.+))?$/.exec(hash);
  if (match && OPERATOR) return { view: "create", id: match[1] ? decodeURIComponent(match[1]) : null };
  match = /^#\/console\/([^/]+)\/(.+)$/.exec(hash);
  if (match && OPERATOR) return { view: "console", node: decodeURIComponent(match[1]), vm: decodeURIComponent(match[2]) };
  return { view: "fleet" };
}

// A user action (a page, a filter) updates only the table: the summary does not depend on
// it, and asking for the whole fleet alongside would make the page wait behind it.
async function update(summary = true) {
  clearTimeout(state.timer);
  const generation = ++state.generation;
  // The whole fleet, for the summary, is the one heavy read: a newer update drops it.
  state.abort?.abort();
  const abort = (state.abort = new AbortController());
  const where = route();
  for (const view of ["fleet", "node", "create", "console"]) {
    const section = $(`${view}-view`);
    if (section) section.hidden = where.view !== view;
  }
  if (where.view === "create" || where.view === "console") {
    // A form being filled in, or a terminal: nothing to poll.
    if (where.view === "create" && state.shown !== location.hash) await loadCreate(where.id).catch(() => {});
    if (where.view === "console") openConsole(where.node, where.vm, rpc);
    else closeConsole();
    state.shown = location.hash;
    return;
  }
  state.shown = location.hash;
  closeConsole();
  const live = $("live");
  let failed = null;
  try {
    if (where.view === "node") await loadNode(where.id, generation);
    else await Promise.all([loadPage(generation).then((shown) => shown && markAction()), summary && loadSummary(abort.signal)]);
  } catch (error) {
    failed = error;
  }
  // A user action began a newer update while this one ran: that one reports, and polls.
  if (generation !== state.generation) return;
  if (failed) {
    live.classList.add("stale");
    live.textContent = `Not updated: ${failed.message}`;
  } else {
    state.updates += 1;
    live.classList.remove("stale");
    live.textContent = `Live: updated ${new Date().toLocaleTimeString()}`;
  }
  // For the tests (and the curious): how many updates ran.
  document.body.dataset.updates = String(state.updates);
  markAction();
  // While the event stream is up, events drive the updates; polling is the fallback
  // (2 s is well inside the offline threshold, so a node's fall shows within one).
  if (!events.live) state.timer = setTimeout(update, POLL_MS);
}

// ---- the event stream (GET /v1/events through this origin) -------------------------

const EVENT_RETRY_MS = [1000, 2000, 5000, 10000, 30000];
const events = { live: false, since: null, attempt: 0, pending: null, socket: null };

// Several events in a burst make one update.
function onEvent(message) {
  try {
    const event = JSON.parse(message.data);
    if (Number.isInteger(event.seq)) events.since = event.seq;
    document.body.dataset.lastEvent = event.type || "";
  } catch {
    return;
  }
  if (events.pending !== null) return;
  events.pending = setTimeout(() => {
    events.pending = null;
    if (route().view === "fleet" || route().view === "node") update();
  }, 100);
}

function followEvents() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const since = events.since === null ? "" : `?since=${events.since}`;
  const socket = new WebSocket(`${scheme}//${location.host}/v1/events${since}`, wsProtocols());
  events.socket = socket;
  socket.onopen = () => {
    events.live = true;
    events.attempt = 0;
    document.body.dataset.events = "live";
    clearTimeout(state.timer);
    update();
  };
  socket.onmessage = onEvent;
  socket.onclose = () => {
    const was = events.live;
    events.live = false;
    document.body.dataset.events = "down";
    // Back to polling at once, and the stream tried again later.
    if (was) update();
    const wait = EVENT_RETRY_MS[Math.min(events.attempt, EVENT_RETRY_MS.length - 1)];
    events.attempt += 1;
    setTimeout(followEvents, wait);
  };
}

// How long the last user action (a page, a filter) took until its table was shown.
function markAction() {
  if (state.pendingAction === null) return;
  document.body.dataset.actionMs = (performance.now() - state.pendingAction).toFixed(1);
  state.pendingAction = null;
}

function act(change) {
  return () => {
    state.pendingAction = performance.now();
    change();
    update(false);
  };
}

function resetPaging() {
  state.cursors = [null];
}

function init() {
  $("operator-links").hidden = !OPERATOR;
  $("footer-text").textContent = OPERATOR ? "Signed in as an operator. Updated as events arrive (every 2 s without them)." : "Read-only (viewer). Updated as events arrive (every 2 s without them).";
  if (OPERATOR) {
    $("vms-head").append(el("th", { scope: "col" }, "Actions"));
    $("vm-form").addEventListener("submit", submitCreate);
    initConsole(rpc);
  }
  $("next").addEventListener("click", act(() => state.next && state.cursors.push(state.next)));
  $("prev").addEventListener("click", act(() => state.cursors.length > 1 && state.cursors.pop()));
  $("first").addEventListener("click", act(resetPaging));
  for (const id of ["f-status", "f-limit"]) $(id).addEventListener("change", act(resetPaging));
  let typing = null;
  for (const id of ["f-label", "f-text"]) {
    // "change" too: a field emptied by a script or an autofill fires no "input", and
    // with the event stream up no poll would pick the change up.
    for (const kind of ["input", "change"]) {
      $(id).addEventListener(kind, () => {
        clearTimeout(typing);
        typing = setTimeout(act(id === "f-label" ? resetPaging : () => {}), 250);
      });
    }
  }
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    act(resetPaging)();
  });
  for (const th of document.querySelectorAll("#nodes th[data-key]")) {
    th.querySelector("button").addEventListener(
      "click",
      act(() => {
        const key = th.dataset.key;
        state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
        for (const other of document.querySelectorAll("#nodes th[data-key]")) {
          other.setAttribute("aria-sort", other === th ? (state.sort.dir === 1 ? "ascending" : "descending") : "none");
        }
      }),
    );
  }
  followEvents();
  window.addEventListener("hashchange", () => {
    update();
    $("main").focus();
  });
  update();
}

init();
