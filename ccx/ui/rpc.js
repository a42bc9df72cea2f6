// JSON-RPC 2.0 over one WebSocket to the ccx server that served this page, reconnecting.
// The token (if any) travels as an offered subprotocol "ccx.bearer.<base64url>" next to
// "ccx"; the server selects "ccx" only (docs/protocol-notes.md). It never goes in a URL.

export const BROWSER_SUBPROTOCOL = 'ccx';
const BEARER_PREFIX = 'ccx.bearer.';
const RETRY_MS = [250, 500, 1000, 2000, 4000];

export class RpcError extends Error {
  constructor(error) {
    super(error.message);
    this.code = error.code;
    this.data = error.data;
  }
}

export function base64url(text) {
  let binary = '';
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

export function wsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

export class Rpc {
  constructor({ onNotification, onState, onOpen }) {
    this.onNotification = onNotification;
    this.onState = onState;
    this.onOpen = onOpen;
    this.token = null;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map();
    this.attempt = 0;
    this.everOpened = false;
    this.stopped = false;
  }

  protocols() {
    return this.token ? [BEARER_PREFIX + base64url(this.token), BROWSER_SUBPROTOCOL]
      : [BROWSER_SUBPROTOCOL];
  }

  connect() {
    this.stopped = false;
    clearTimeout(this.timer);
    const ws = new WebSocket(wsUrl(), this.protocols());
    this.ws = ws;
    let opened = false;
    this.onState(this.everOpened ? 'reconnecting' : 'connecting');
    ws.onopen = () => {
      opened = true;
      this.everOpened = true;
      this.attempt = 0;
      this.onState('open');
      this.onOpen();
    };
    ws.onmessage = (event) => this.receive(event.data);
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      for (const { reject } of this.pending.values()) reject(new Error('connection closed'));
      this.pending.clear();
      if (this.stopped) return;
      if (!opened && !this.everOpened) {  // refused before it ever worked: 401 looks like this
        this.onState('auth');
        return;
      }
      this.onState('reconnecting');
      const delay = RETRY_MS[Math.min(this.attempt++, RETRY_MS.length - 1)];
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  close() {
    this.stopped = true;
    if (this.ws) this.ws.close();
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    for (const item of Array.isArray(message) ? message : [message]) {
      if (item.method !== undefined) {
        this.onNotification(item.method, item.params || {});
      } else if (this.pending.has(item.id)) {
        const { resolve, reject } = this.pending.get(item.id);
        this.pending.delete(item.id);
        if (item.error) reject(new RpcError(item.error));
        else resolve(item.result);
      }
    }
  }

  request(method, params = {}) {
    if (!this.open) return Promise.reject(new Error('not connected'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
    });
  }
}
