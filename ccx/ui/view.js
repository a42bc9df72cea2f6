// One session on screen: a log view (pipes) or a terminal (PTY), live, with replay.
// By default the console *watches* (PROTOCOL.md 11): it never takes the session from its
// owner. "Take over" attaches. A session this console owns (started here, or taken over)
// streams to it as its owner instead; either way one stream per session reaches the page,
// and after a dropped connection it resumes from the last seq shown (since_seq), no gap.
// Everything from the session is rendered as text (textContent / xterm), never as HTML.
import { makeTerminal } from './term.js';
import { Sparkline, formatBytes } from './spark.js';

const $ = (id) => document.getElementById(id);
const MAX_CHUNKS = 20000;  // log spans kept on screen; older ones are dropped from the view
const RESIZE_DEBOUNCE_MS = 150;

function decode(params, decoders) {
  if (params.encoding !== 'base64') return params.data;
  const binary = atob(params.data);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  if (params.stream === 'pty') return bytes;
  decoders[params.stream] ||= new TextDecoder('utf-8');
  return decoders[params.stream].decode(bytes, { stream: true });
}

function rawLength(params) {
  if (params.encoding === 'base64') return Math.floor(params.data.length * 3 / 4);
  return new TextEncoder().encode(params.data).length;
}

export class SessionView {
  constructor(app, id) {
    this.app = app;
    this.rpc = app.rpc;
    this.id = id;
    this.lastSeq = -1;
    this.ready = false;
    this.ended = false;
    this.mode = null;  // 'watch' or 'owner'
    this.status = null;
    this.decoders = {};
    this.terminal = null;
    this.typed = '';
    this.typing = false;
    this.log = $('sv-log');
    this.log.replaceChildren();
    $('sv-term').replaceChildren();
    $('sv-final').hidden = true;
    $('sv-final').textContent = '';
    $('sv-error').textContent = '';
    $('sv-search').value = '';
    $('sv-hits').textContent = '';
    $('sv-command').textContent = '';
    this.spark = new Sparkline($('sv-spark'), $('sv-rate'));
    $('sv-pause').onclick = () => this.control('PAUSE');
    $('sv-resume').onclick = () => this.control('RESUME');
    $('sv-cancel').onclick = () => this.control('CANCEL');
    $('sv-take').onclick = () => this.takeOver();
    $('sv-search').oninput = () => this.search();
    $('sv-search').onkeydown = (event) => { if (event.key === 'Enter') this.nextHit(); };
    this.onResize = () => {
      clearTimeout(this.resizeTimer);
      this.resizeTimer = setTimeout(() => this.fit(), RESIZE_DEBOUNCE_MS);
    };
    window.addEventListener('resize', this.onResize);
    this.setStatus(null);
  }

  // (Re)subscribe: on open, and again after a reconnect.
  async open() {
    try {
      this.info = await this.rpc.request('status', { session_id: this.id });
      $('sv-command').textContent = this.info.command.join(' ');
      $('sv-command').title = this.info.command.join(' ');
      if (this.info.pty) this.showTerminal(this.info.pty);
      else this.showLog();
      await this.subscribe(this.lastSeq);
    } catch (error) {
      this.fail(error);
    }
  }

  async subscribe(since) {
    this.ready = false;
    const owned = this.app.owned.has(this.id);
    const method = owned ? 'attach' : 'watch';
    let result;
    try {
      result = await this.rpc.request(method, { session_id: this.id, since_seq: since });
    } catch (error) {
      if (error.code !== -32006) throw error;
      this.note(`output after seq ${since} is no longer held; resuming at seq ${error.data.first_seq}`);
      result = await this.rpc.request(method, { session_id: this.id, since_seq: -1 });
    }
    this.mode = owned ? 'owner' : 'watch';
    this.ready = true;
    $('sv-mode').textContent = owned ? 'owner: this console' : 'watching (the owner keeps it)';
    $('sv-take').disabled = owned;
    if (!this.ended) this.setStatus(result.status);
    if (owned) this.fit();
  }

  showLog() {
    $('sv-log').hidden = false;
    $('sv-logbar').hidden = false;
    $('sv-term').hidden = true;
  }

  showTerminal(size) {
    $('sv-log').hidden = true;
    $('sv-logbar').hidden = true;
    $('sv-term').hidden = false;
    if (this.terminal) return;
    this.terminal = makeTerminal($('sv-term'), size);
    this.terminal.term.onData((data) => this.type(data));
    this.terminal.term.focus();
  }

  // A PTY this console owns follows the browser window; one it only watches keeps the size
  // its owner chose (a watcher does not resize someone else's terminal).
  fit() {
    if (!this.terminal || this.ended) return;
    const { term, fit } = this.terminal;
    if (this.mode !== 'owner') {
      if (this.info?.pty) term.resize(this.info.pty.cols, this.info.pty.rows);
      return;
    }
    const size = fit.proposeDimensions();
    if (!size || !size.cols || !size.rows) return;
    if (size.cols === term.cols && size.rows === term.rows && this.resized) return;
    term.resize(size.cols, size.rows);
    this.resized = true;
    this.rpc.request('resize', { session_id: this.id, cols: size.cols, rows: size.rows })
      .catch((error) => this.fail(error));
  }

  // Keystrokes go out one request at a time, in order (what is typed meanwhile is batched).
  type(data) {
    this.typed += data;
    if (!this.typing) this.flushTyped();
  }

  async flushTyped() {
    this.typing = true;
    try {
      while (this.typed) {
        const data = this.typed;
        this.typed = '';
        await this.rpc.request('input', { session_id: this.id, data });
      }
    } catch (error) {
      this.fail(error);
    } finally {
      this.typing = false;
    }
  }

  onNotification(method, params) {
    if (method === 'process.output') {
      if (!this.ready || params.seq <= this.lastSeq) return;
      if (this.lastSeq >= 0 && params.seq > this.lastSeq + 1) {
        this.note(`seq ${this.lastSeq + 1} to ${params.seq - 1} missing`);
      }
      this.lastSeq = params.seq;
      this.spark.add(rawLength(params));
      const data = decode(params, this.decoders);
      if (this.terminal) this.terminal.term.write(data);
      else this.append(params.stream, data);
    } else if (method === 'process.paused') {
      if (this.ready) this.setStatus('paused');
    } else if (method === 'process.resumed') {
      if (this.ready) this.setStatus('running');
    } else if (method === 'process.completed') {
      if (this.ready) this.complete(params);
    } else if (method === 'process.lagged') {
      this.note(`this view fell behind: output before seq ${params.first_seq} is no longer held`);
      this.subscribe(-1).catch((error) => this.fail(error));
    } else if (method === 'process.detached') {
      this.app.owned.delete(this.id);
      this.note('another client took this session over; watching it now');
      this.subscribe(this.lastSeq).catch((error) => this.fail(error));
    }
  }

  append(stream, text) {
    if (!text) return;
    const span = document.createElement('span');
    span.className = `out-${stream}`;
    span.textContent = text;
    this.addSpan(span);
  }

  note(text) {
    const span = document.createElement('span');
    span.className = 'out-note';
    span.textContent = `\n[ccx console: ${text}]\n`;
    if (this.terminal) this.terminal.term.write(`\r\n\x1b[33m[ccx console: ${text}]\x1b[0m\r\n`);
    else this.addSpan(span);
  }

  addSpan(span) {
    const query = $('sv-search').value;
    if (query && span.textContent.includes(query)) span.classList.add('hit');
    this.log.append(span);
    while (this.log.childElementCount > MAX_CHUNKS) this.log.firstElementChild.remove();
    if ($('sv-follow').checked && !this.scrollQueued) {
      this.scrollQueued = true;
      requestAnimationFrame(() => {
        this.scrollQueued = false;
        this.log.scrollTop = this.log.scrollHeight;
      });
    }
    if (query) this.countHits();
  }

  search() {
    const query = $('sv-search').value;
    for (const span of this.log.children) {
      span.classList.toggle('hit', Boolean(query) && span.textContent.includes(query));
    }
    this.hitIndex = -1;
    this.countHits();
  }

  countHits() {
    const query = $('sv-search').value;
    $('sv-hits').textContent = query
      ? `${this.log.querySelectorAll('.hit').length} chunks match` : '';
  }

  nextHit() {
    const hits = this.log.querySelectorAll('.hit');
    if (!hits.length) return;
    $('sv-follow').checked = false;
    this.hitIndex = ((this.hitIndex ?? -1) + 1) % hits.length;
    hits[this.hitIndex].scrollIntoView({ block: 'center' });
  }

  setStatus(status) {
    this.status = status;
    const element = $('sv-status');
    element.textContent = status || '…';
    element.className = `status st-${status}`;
    const live = status === 'running' || status === 'paused';
    $('sv-pause').disabled = status !== 'running';
    $('sv-resume').disabled = status !== 'paused';
    $('sv-cancel').disabled = !live;
  }

  complete(params) {
    this.ended = true;
    this.setStatus(params.status);
    $('sv-take').disabled = true;
    const parts = [params.status];
    if (params.exit_code !== null && params.exit_code !== undefined) parts.push(`exit code ${params.exit_code}`);
    if (params.signal) parts.push(`signal ${params.signal}`);
    if (params.reason) parts.push(`reason ${params.reason}`);
    parts.push(`${Number(params.duration_s).toFixed(2)} s`);
    parts.push(`stdout ${formatBytes(params.stdout_bytes)}`, `stderr ${formatBytes(params.stderr_bytes)}`);
    const final = $('sv-final');
    final.textContent = `ended: ${parts.join(' · ')}`;
    final.hidden = false;
    this.app.owned.delete(this.id);
  }

  async control(type) {
    try {
      const result = await this.rpc.request('control', { session_id: this.id, type });
      if (!this.ended) this.setStatus(result.status);
    } catch (error) {
      this.fail(error);
    }
  }

  async takeOver() {
    try {
      if (this.mode === 'watch') await this.rpc.request('unwatch', { session_id: this.id });
      this.app.owned.set(this.id, this.lastSeq);
      await this.subscribe(this.lastSeq);
    } catch (error) {
      this.fail(error);
    }
  }

  fail(error) {
    $('sv-error').textContent = error.message || String(error);
  }

  close() {
    this.spark.stop();
    window.removeEventListener('resize', this.onResize);
    if (this.mode === 'watch' && this.rpc.open) {
      this.rpc.request('unwatch', { session_id: this.id }).catch(() => {});
    }
    if (this.terminal) this.terminal.term.dispose();
    this.terminal = null;
  }
}
