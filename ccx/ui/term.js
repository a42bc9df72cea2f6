// xterm.js under the console's CSP. xterm writes its theme and cell metrics into <style>
// elements it creates, and per-cell colours into `style` attributes; the CSP allows neither
// inline. So, before xterm runs: <style> elements get this page's nonce (served fresh with
// each page, see ccx/transport/ui.py), and `setAttribute('style', ...)` becomes a CSSOM
// write (`el.style.cssText`), which CSP does not govern. Nothing else is touched.
import { Terminal } from './vendor/xterm/xterm.mjs';
import { FitAddon } from './vendor/xterm/addon-fit.mjs';

const nonce = document.getElementById('ccx-app')?.nonce || '';
const createElement = Document.prototype.createElement;
Document.prototype.createElement = function (tag, options) {
  const element = createElement.call(this, tag, options);
  if (nonce && String(tag).toLowerCase() === 'style') element.nonce = nonce;
  return element;
};
const setAttribute = Element.prototype.setAttribute;
Element.prototype.setAttribute = function (name, value) {
  if (String(name).toLowerCase() === 'style' && this.style !== undefined) {
    this.style.cssText = String(value);
    return;
  }
  setAttribute.call(this, name, value);
};

export function makeTerminal(container, { cols, rows }) {
  const term = new Terminal({
    cols, rows, convertEol: false, scrollback: 5000, cursorBlink: true,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace', fontSize: 13,
    theme: { background: '#000000' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(container);
  return { term, fit };
}
