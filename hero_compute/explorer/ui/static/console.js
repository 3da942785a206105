// The console view: a VM's first serial port in xterm.js (served from this origin with
// the page), first the last 64 KiB of vm.console_log, then the live stream over the
// dashboard's console WebSocket (binary frames of raw serial bytes, CONTRACT §8).
// Reconnects after a drop, with a growing pause; copy and paste by keys and buttons.

const LOG_BYTES = 65536;
const RETRY_MS = [1000, 2000, 4000, 8000, 15000];

const $ = (id) => document.getElementById(id);

// The session's CSRF token: a client certificate's is in the page; a login's came once
// in the login redirect's fragment (app.js keeps it in sessionStorage), never with the
// cookie alone.
export const KEY_ITEM = "hero-ui-key";
export function sessionKey() {
  return document.querySelector('meta[name="csrf-token"]')?.content || sessionStorage.getItem(KEY_ITEM) || "";
}

// A WebSocket can carry no header of ours: the key rides as a subprotocol.
export function wsProtocols() {
  return ["hero-ui", `k.${sessionKey()}`];
}

let loading = null; // the Promise of xterm.js being loaded, once
let current = null; // the open console: {key, term, fit, socket, timer, closed}

function load(tag, attrs) {
  return new Promise((resolve, reject) => {
    const node = document.createElement(tag);
    Object.assign(node, attrs);
    node.onload = resolve;
    node.onerror = () => reject(new Error(`could not load ${attrs.src || attrs.href}`));
    document.head.append(node);
  });
}

// xterm.js writes its sizes and colours into <style> elements it makes; the page's CSP
// (style-src 'self', nothing inline) refuses those, so their text is mirrored into a
// constructed style sheet, which CSP allows.
function mirrorStyles(box) {
  const sheets = new Map();
  const sync = () => {
    for (const style of box.querySelectorAll("style")) {
      let sheet = sheets.get(style);
      if (!sheet) {
        sheet = new CSSStyleSheet();
        sheets.set(style, sheet);
        document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
      }
      sheet.replaceSync(style.textContent || "");
    }
  };
  const observer = new MutationObserver(sync);
  observer.observe(box, { childList: true, subtree: true, characterData: true });
  sync();
  return () => {
    observer.disconnect();
    const gone = new Set(sheets.values());
    document.adoptedStyleSheets = document.adoptedStyleSheets.filter((s) => !gone.has(s));
  };
}

function xterm() {
  loading ??= Promise.all([
    load("link", { rel: "stylesheet", href: "/static/xterm.css" }),
    load("script", { src: "/static/xterm.js" }).then(() => load("script", { src: "/static/xterm-addon-fit.js" })),
  ]).then(() => ({ Terminal: globalThis.Terminal, FitAddon: globalThis.FitAddon.FitAddon }));
  return loading;
}

function say(text, bad = false) {
  const state = $("console-state");
  state.textContent = text;
  state.classList.toggle("failed", bad);
  document.body.dataset.console = bad ? "down" : text.startsWith("Live") ? "live" : "connecting";
}

export function closeConsole() {
  if (!current) return;
  current.closed = true;
  clearTimeout(current.timer);
  current.socket?.close(1000, "console view closed");
  current.unmirror();
  current.term.dispose();
  window.removeEventListener("resize", current.onResize);
  current = null;
}

async function copySelection() {
  const text = current?.term.getSelection();
  if (text) await navigator.clipboard.writeText(text);
}

async function paste() {
  const text = await navigator.clipboard.readText();
  if (text) current?.term.paste(text);
}

// The log's tail first, then the live stream: output between the two may show twice or
// not at all (the node keeps no cursor for us); each reconnect starts afresh.
async function connect(view, rpc) {
  if (view.closed) return;
  clearTimeout(view.timer);
  view.socket?.close(1000, "reconnecting");
  say("Connecting…");
  view.term.reset();
  try {
    const log = await rpc("explorer.call", { node_id: view.node, method: "vm.console_log", params: { vm_id: view.vm, bytes: LOG_BYTES } });
    if (view.closed) return;
    view.term.write(log.data);
  } catch (error) {
    view.term.write(`\r\n[the log is not available: ${error.message}]\r\n`);
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/v1/nodes/${encodeURIComponent(view.node)}/vms/${encodeURIComponent(view.vm)}/console`, wsProtocols());
  socket.binaryType = "arraybuffer";
  view.socket = socket;
  socket.onopen = () => {
    view.attempt = 0;
    say("Live");
  };
  socket.onmessage = (event) => view.term.write(new Uint8Array(event.data));
  socket.onclose = () => {
    if (view.closed || view.socket !== socket) return;
    const wait = RETRY_MS[Math.min(view.attempt, RETRY_MS.length - 1)];
    view.attempt += 1;
    say(`Disconnected: reconnecting in ${wait / 1000} s`, true);
    view.timer = setTimeout(() => connect(view, rpc), wait);
  };
}

export async function openConsole(node, vm, rpc) {
  const key = `${node}/${vm}`;
  if (current?.key === key) return;
  closeConsole();
  $("console-title").textContent = `Console of VM ${vm} on node ${node}`;
  $("console-back").href = `#/node/${encodeURIComponent(node)}`;
  say("Loading the terminal…");
  let lib;
  try {
    lib = await xterm();
  } catch (error) {
    say(`The terminal could not be loaded: ${error.message}`, true);
    return;
  }
  const box = $("terminal");
  box.replaceChildren();
  const unmirror = mirrorStyles(box);
  const term = new lib.Terminal({ convertEol: false, cursorBlink: true, scrollback: 5000, screenReaderMode: true });
  const fit = new lib.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  const view = { key, node, vm, term, fit, unmirror, socket: null, timer: null, closed: false, attempt: 0 };
  view.onResize = () => fit.fit();
  window.addEventListener("resize", view.onResize);
  const encoder = new TextEncoder();
  term.onData((data) => view.socket?.readyState === WebSocket.OPEN && view.socket.send(encoder.encode(data)));
  term.onBinary((data) => view.socket?.readyState === WebSocket.OPEN && view.socket.send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
  term.attachCustomKeyEventHandler((event) => {
    if (event.type !== "keydown" || !event.ctrlKey || !event.shiftKey) return true;
    if (event.code === "KeyC") copySelection();
    else if (event.code === "KeyV") paste();
    else return true;
    return false;
  });
  current = view;
  term.focus();
  await connect(view, rpc);
}

export function initConsole(rpc) {
  $("console-copy").addEventListener("click", copySelection);
  $("console-paste").addEventListener("click", paste);
  $("console-reconnect").addEventListener("click", () => current && connect(current, rpc));
}
