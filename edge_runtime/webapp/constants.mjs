// The numbers both sides share, written from the Python modules by edge_runtime/webapp_data.py (never edit
// constants.json by hand: a Python test and a JS test check it against the Python constants and the card).
// Read with top-level await (fetch in the browser, the file in node's unit tests) rather than a JSON import
// attribute, which Debian's older node does not parse.
const url = new URL('./constants.json', import.meta.url);
const C = url.protocol === 'file:'
  ? JSON.parse(await (await import('node:fs/promises')).readFile(url, 'utf8'))
  : await (await fetch(url)).json();

export function loadConstants() { return C; }
