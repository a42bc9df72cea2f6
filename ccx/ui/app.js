// The ccx web console: session list, start form, session view. Plain ES modules, no build.
// Talks to the server only through the WebSocket JSON-RPC API (rpc.js); renders every
// command line and every byte of output as text (textContent), never as HTML.
import { Rpc } from './rpc.js';
import { SessionView } from './view.js';
import { formatBytes } from './spark.js';

const $ = (id) => document.getElementById(id);
const LIST_REFRESH_MS = 1000;
const TOKEN_KEY = 'ccx-token';  // sessionStorage: this tab only, gone when it closes

const app = {
  rpc: null,
  owned: new Map(),  // id -> last seq received as its owner (for attach after a reconnect)
  serverInfo: null,
  view: null,
  sessions: [],
};

function setConn(state) {
  const element = $('conn');
  element.dataset.state = state;
  element.textContent = { open: 'connected', connecting: 'connecting', reconnecting: 'reconnecting…',
    auth: 'token required', closed: 'disconnected' }[state] || state;
  if (state === 'auth') showLogin(app.rpc.token ? 'refused: wrong token?' : '');
}

function showLogin(message) {
  $('main').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('token').focus();
}

function onNotification(method, params) {
  const id = params.session_id;
  if (app.owned.has(id)) {
    if (method === 'process.output') app.owned.set(id, Math.max(app.owned.get(id), params.seq));
    else if (method === 'process.completed' && !(app.view && app.view.id === id)) app.owned.delete(id);
    else if (method === 'process.detached' && !(app.view && app.view.id === id)) app.owned.delete(id);
  }
  if (app.view && app.view.id === id) app.view.onNotification(method, params);
}

async function onOpen() {
  $('login').hidden = true;
  $('main').hidden = false;
  try {
    app.serverInfo = await app.rpc.request('server.info');
    $('server-name').textContent = `${app.serverInfo.name} ${app.serverInfo.version}`
      + (app.serverInfo.node ? ` · node ${app.serverInfo.node}` : '');
  } catch { /* shown by the list refresh if it persists */ }
  for (const [id, seq] of [...app.owned]) {  // a dropped connection: take them back, no gap
    if (app.view && app.view.id === id) continue;
    app.rpc.request('attach', { session_id: id, since_seq: seq }).catch((error) => {
      if (error.code === -32006) {
        app.rpc.request('attach', { session_id: id, since_seq: -1 }).catch(() => {});
      } else {
        app.owned.delete(id);
      }
    });
  }
  if (app.view) app.view.open();
  refreshList();
}

// ------------------------------------------------------------------------------ list

function age(info) {
  const start = Date.parse(info.started_at);
  const end = info.ended_at ? Date.parse(info.ended_at) : Date.now();
  const s = Math.max(0, Math.round((end - start) / 1000));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function connection(info) {
  const live = ['running', 'paused', 'cancelling'].includes(info.status);
  let text = info.attached ? 'attached' : (live && info.linger > 0 ? 'lingering' : '—');
  if (app.owned.has(info.session_id)) text += ' (this console)';
  return text;
}

function cell(text, className) {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderList() {
  const tag = $('filter-tag').value.trim();
  const status = $('filter-status').value;
  const shown = app.sessions.filter((s) => (!tag || (s.tag || '').includes(tag))
    && (!status || s.status === status));
  const rows = shown.map((info) => {
    const tr = document.createElement('tr');
    tr.dataset.id = info.session_id;
    tr.append(
      cell(info.status, `status st-${info.status}`),
      cell(info.command.join(' '), 'command'),
      cell(info.tag || ''),
      cell(info.node || app.serverInfo?.node || '—'),
      cell(age(info)),
      cell(formatBytes(info.stdout_bytes + info.stderr_bytes)),
      cell(connection(info), 'connection'),
    );
    tr.querySelector('.command').title = info.command.join(' ');
    tr.onclick = () => { location.hash = `#/s/${encodeURIComponent(info.session_id)}`; };
    return tr;
  });
  $('sessions').tBodies[0].replaceChildren(...rows);
  $('count').textContent = `${shown.length} of ${app.sessions.length} sessions`;
}

async function refreshList() {
  if (!app.rpc.open) return;
  try {
    // Many nodes (PROTOCOL.md 10): every node's sessions; opening one is forwarded to its node.
    const fleet = app.serverInfo?.capabilities?.includes('cluster');
    const result = await app.rpc.request('sessions', fleet ? { scope: 'cluster' } : {});
    app.sessions = result.sessions.sort((a, b) => b.started_at.localeCompare(a.started_at));
    renderList();
  } catch { /* reconnecting */ }
}

async function startSession(event) {
  event.preventDefault();
  $('start-error').textContent = '';
  const params = { command: $('start-command').value };
  if ($('start-cwd').value) params.cwd = $('start-cwd').value;
  if ($('start-tag').value) params.tag = $('start-tag').value;
  const linger = Number($('start-linger').value);
  if (linger > 0) params.linger = linger;
  if ($('start-pty').checked) {
    params.pty = { cols: Number($('start-cols').value), rows: Number($('start-rows').value) };
  }
  try {
    const result = await app.rpc.request('execute', params);
    app.owned.set(result.session_id, -1);
    location.hash = `#/s/${encodeURIComponent(result.session_id)}`;
  } catch (error) {
    $('start-error').textContent = `${error.message}${error.code ? ` (${error.code})` : ''}`;
  }
}

// ------------------------------------------------------------------------------ routing

function route() {
  const match = location.hash.match(/^#\/s\/(.+)$/);
  const id = match ? decodeURIComponent(match[1]) : null;
  if (app.view && app.view.id !== id) {
    app.view.close();
    app.view = null;
  }
  $('list-view').hidden = Boolean(id);
  $('session-view').hidden = !id;
  if (id && !app.view) {
    app.view = new SessionView(app, id);
    if (app.rpc.open) app.view.open();
  }
  if (!id) refreshList();
}

async function main() {
  app.rpc = new Rpc({ onNotification, onState: setConn, onOpen });
  $('filter-tag').oninput = renderList;
  $('filter-status').onchange = renderList;
  $('start-form').onsubmit = startSession;
  $('login-form').onsubmit = (event) => {
    event.preventDefault();
    app.rpc.token = $('token').value;
    sessionStorage.setItem(TOKEN_KEY, app.rpc.token);
    app.rpc.everOpened = false;
    app.rpc.connect();
  };
  window.addEventListener('hashchange', route);
  setInterval(() => { if (!app.view) refreshList(); }, LIST_REFRESH_MS);
  route();
  let meta = { token_required: false };
  try {
    meta = await (await fetch('meta.json', { cache: 'no-store' })).json();
  } catch { /* assume none; a refusal shows the form anyway */ }
  app.rpc.token = sessionStorage.getItem(TOKEN_KEY);
  if (meta.token_required && !app.rpc.token) {
    setConn('auth');
    return;
  }
  app.rpc.connect();
}

window.ccxConsole = app;  // for tests and the curious: the state, the connection
main();
