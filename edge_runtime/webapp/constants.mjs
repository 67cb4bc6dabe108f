// The numbers both sides share, written from the Python modules by edge_runtime/webapp_data.py (never edit
// constants.json by hand: a Python test and a JS test check it against the Python constants and this card).
import C from './constants.json' with { type: 'json' };

export function loadConstants() { return C; }
