// The report: report.py's TEMPLATE (exported into constants.json, so there is one template) filled by the same
// logic-less Mustache subset as report.fill, from the same plain dict as report.report_data.
import { loadConstants } from './constants.mjs';
import { cellKey, isEdge, isLeftOut, toJson } from './slide.mjs';

const C = loadConstants();
const TAG = /\{\{([#^/]?)\s*([\w.]+)\s*\}\}/g;

function escapeHtml(s) {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&#x27;');
}

function lookup(stack, name) {
  if (name === '.') return stack[stack.length - 1];
  const [head, ...rest] = name.split('.');
  let value; let found = false;
  for (let i = stack.length - 1; i >= 0; i--) {
    const ctx = stack[i];
    if (ctx && typeof ctx === 'object' && !Array.isArray(ctx) && head in ctx) { value = ctx[head]; found = true; break; }
  }
  if (!found) return null;
  for (const part of rest) {
    if (part === 'length' && Array.isArray(value)) value = value.length;
    else if (value && typeof value === 'object' && !Array.isArray(value)) value = value[part];
    else return null;
  }
  return value;
}

const truthy = (v) => !(v === null || v === undefined || v === false || v === 0 || v === '' || (Array.isArray(v) && !v.length)
  || (typeof v === 'object' && !Array.isArray(v) && !Object.keys(v).length));

/** report.fill */
export function fill(template, data) {
  const render = (text, stack) => {
    let out = ''; let pos = 0;
    for (;;) {
      TAG.lastIndex = pos;
      const m = TAG.exec(text);
      if (!m) return out + text.slice(pos);
      out += text.slice(pos, m.index);
      const [, kind, name] = m;
      if (kind === '#' || kind === '^') {
        let depth = 1; let scan = m.index + m[0].length; let inner;
        while (depth) {
          TAG.lastIndex = scan;
          inner = TAG.exec(text);
          if (!inner) throw new Error(`template: section ${name} is not closed`);
          if (inner[2] === name && (inner[1] === '#' || inner[1] === '^')) depth++;
          else if (inner[2] === name && inner[1] === '/') depth--;
          scan = inner.index + inner[0].length;
        }
        const body = text.slice(m.index + m[0].length, inner.index);
        const value = lookup(stack, name);
        if (kind === '^') { if (!truthy(value)) out += render(body, stack); } else if (Array.isArray(value)) {
          for (const item of value) out += render(body, [...stack, item]);
        } else if (truthy(value)) out += render(body, [...stack, value]);
        pos = scan;
      } else {
        const value = lookup(stack, name);
        out += value === null || value === undefined ? '' : escapeHtml(pyStr(value));
        pos = m.index + m[0].length;
      }
    }
  };
  return render(template, [data]);
}

/** Python's repr/str of a float (1e-05, 0.0, 12.5) and of other values as report.py's template gets them. */
export function pyRepr(v) {
  if (typeof v !== 'number') return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e16) return `${v}.0`;
  const abs = Math.abs(v);
  if (abs !== 0 && (abs < 1e-4 || abs >= 1e16)) {
    const [m, e] = v.toExponential().split('e');
    const n = Number(e);
    return `${m}e${n < 0 ? '-' : '+'}${String(Math.abs(n)).padStart(2, '0')}`;
  }
  return String(v);
}
function pyStr(v) {
  if (v === true) return 'True';
  if (v === false) return 'False';
  return String(v);
}
const pyJson = (v) => (v === null || v === undefined ? 'null' : Array.isArray(v) ? `[${v.map(pyJson).join(', ')}]`
  : typeof v === 'number' ? pyRepr(v) : typeof v === 'object' ? `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pyJson(x)}`).join(', ')}}`
    : JSON.stringify(v));
const pctText = (v) => (v === null || v === undefined ? 'n/a' : `${(100 * v).toFixed(2)}%`);
const thousands = (v) => Math.round(v).toLocaleString('en-US');

/** report.slide_data: ``fields`` are this slide's fields with {source, name, cells, overlaySrc(ranks)} and
 * ``crops`` a Map cellKey -> data URI. */
export function slideData(result, index, { overlays = [], crops = new Map(), galleryLimit = 60 } = {}) {
  const j = toJson(result);
  const cands = result.candidate_list;
  const gallery = cands.slice(0, galleryLimit).map((row) => {
    const path = String(row.path ?? '');
    const stem = path.split('/').pop().replace(/\.[^.]*$/, '');
    return {
      id: `s${index}-c${row.rank}`, rank: row.rank, prob: Number(row.prob_parasitized).toFixed(2), field: path,
      cell: row.cell ?? '',
      label: (row.cell !== null && row.cell !== undefined && row.cell !== '' ? `${stem} cell ${row.cell}` : stem)
        + (isEdge(row) ? ' (cut by the image edge, not counted)' : '') + (isLeftOut(row) ? ' (field left out, not counted)' : ''),
      src: crops.get(cellKey(row)) ?? '',
    };
  });
  const ci = j.parasitemia_ci;
  const extra = cands.length <= galleryLimit ? '' : ` (gallery shows the first ${galleryLimit})`;
  return {
    id: index, name: result.name || `${index + 1}`, json: pyJson(j), call: result.call, call_class: result.call.replace(/ /g, '-'),
    reviewed: result.reviewed, reason: result.reason, cells: j.cells, candidates: j.candidates,
    parasitemia: j.parasitemia === null ? '' : pyRepr(j.parasitemia),
    parasitemia_ci: ci === null ? '' : pyJson(ci),
    parasites_per_ul: j.parasites_per_ul === null ? '' : pyRepr(j.parasites_per_ul),
    detection_limit: j.detection_limit === null ? '' : pyRepr(j.detection_limit),
    cells_text: thousands(j.cells) + (result.excluded_fields.length ? ` (of ${thousands(result.cells_total)}; fields left out below)` : ''),
    candidates_text: thousands(j.candidates) + extra + (result.reviewed ? `; ${result.confirmed} confirmed` : ''),
    parasitemia_text: pctText(j.parasitemia),
    ci_text: ci === null ? 'n/a' : `${pctText(ci[0])} to ${pctText(ci[1])}`,
    per_ul_text: j.parasites_per_ul === null ? 'n/a' : `${thousands(j.parasites_per_ul)} (at ${thousands(result.rbc_per_ul)} red cells/µL)`,
    dl_text: `${pctText(j.detection_limit)} (${result.detection_limit_meaning})`,
    method: `${result.method}; rates measured on ${result.rates.measured_on ?? '?'} (${result.source}).`,
    warnings: [...result.warnings], gallery, overlays,
  };
}

/** report.report_data */
export function reportData(slides, { modelName, modelSha256, date = null, title = 'Malaria screening report', version = '',
  provenance = {} }) {
  return {
    title, disclaimer: C.report.DISCLAIMER, version, date: date ?? new Date().toISOString().slice(0, 16).replace('T', ' '),
    model: { name: modelName, sha256: (modelSha256 || '').slice(0, 12) },
    provenance: Object.entries(provenance || {}).map(([source, terms]) => ({ source, ...terms })), slides,
  };
}

export function renderReport(data) { return fill(C.report.TEMPLATE, data); }
