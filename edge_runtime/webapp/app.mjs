// The page: take or choose a field photo, find and classify its cells, add it to a slide, read the slide, review
// its candidates, and keep or export the results -- all on the phone. Exposes the test hook
// window.malariaEdge.classifyField(blob) -> {cells: [{x, y, w, h, prob_parasitized, prediction}], warnings}.
import * as litert from '@litertjs/core';
import { CellModel } from './classify.mjs';
import { loadConstants } from './constants.mjs';
import { useCv } from './cvutil.mjs';
import { decodeImage } from './decode.mjs';
import { CELL_COLUMNS, cropName, rowsToCsv, zip } from './export.mjs';
import { classifyPixels } from './field.mjs';
import { drawOverlay } from './overlay.mjs';
import { renderReport, reportData, slideData } from './report.mjs';
import { assessSlide, cellKey, isEdge, isLeftOut } from './slide.mjs';
import * as store from './store.mjs';

const C = loadConstants();
const $ = (id) => document.getElementById(id);
const state = { model: null, card: null, current: null, timings: {} };

async function loadCv() {
  let cv = window.cv;
  if (!cv) throw new Error('opencv.js did not load');
  if (typeof cv.then === 'function' && !cv.Mat) cv = await cv;
  if (!cv.Mat) await new Promise((resolve) => { cv.onRuntimeInitialized = resolve; });
  useCv(cv);
  return cv;
}

function sha256Hex(buffer) {
  if (!crypto?.subtle) return Promise.resolve(null); // not a secure context: checked by edge-serve's install instead
  return crypto.subtle.digest('SHA-256', buffer).then((d) => [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, '0')).join(''));
}

async function start() {
  const t0 = performance.now();
  await loadCv();
  const t1 = performance.now();
  const cardResponse = await fetch(`model/${C.model.card}`);
  state.card = await cardResponse.json();
  const modelBytes = await (await fetch(`model/${C.model.file}`)).arrayBuffer();
  const digest = await sha256Hex(modelBytes);
  if (digest && digest !== C.model.sha256) throw new Error(`the model file is damaged (SHA-256 ${digest.slice(0, 12)}..., expected ${C.model.sha256.slice(0, 12)}...)`);
  const url = URL.createObjectURL(new Blob([modelBytes]));
  state.model = await CellModel.load(litert, url, new URL('vendor/litert/wasm/', document.baseURI).href);
  URL.revokeObjectURL(url);
  // performance.now() counts from navigation: opencv.js (a classic script before this module) is in t1.
  state.timings = { opencv_ms: t1, model_ms: performance.now() - t1, total_ms: performance.now(), module_start_ms: t0 };
  $('status').textContent = `Ready: model ${state.card.name} (${C.model.sha256.slice(0, 12)}), loaded in ${(state.timings.total_ms / 1000).toFixed(1)} s. Works offline.`;
  $('photo').disabled = false;
}

const ready = start().catch((err) => {
  $('status').textContent = `Could not start: ${err.message || err}`;
  throw err;
});

async function classifyBlob(blob, name) {
  await ready;
  const img = await decodeImage(blob);
  const t = performance.now();
  const result = await classifyPixels(img, state.model, state.card);
  result.ms.total = performance.now() - t;
  result.name = name;
  result.img = img;
  return result;
}

window.malariaEdge = {
  ready,
  timings: () => ({ ...state.timings }),
  async classifyField(blob) {
    const r = await classifyBlob(blob, blob.name || 'field');
    return {
      cells: r.cells.map((c) => ({ x: c.x, y: c.y, w: c.w, h: c.h, prob_parasitized: c.prob_parasitized, prediction: c.prediction, unfamiliar: c.unfamiliar, at_edge: c.at_edge })),
      warnings: r.warnings, messages: r.quality.messages, diameter: r.diameter, ms: r.ms, width: r.width, height: r.height,
    };
  },
};

// ------------------------------------------------------------------------------------------------------ the field
function ownRanks(cells) {
  const called = cells.filter((c) => c.prediction === C.labels.PARASITIZED).sort((a, b) => b.prob_parasitized - a.prob_parasitized);
  return new Map(called.map((c, i) => [c.index, i + 1]));
}

function paint(canvas, picture) {
  canvas.width = picture.width; canvas.height = picture.height;
  canvas.getContext('2d').putImageData(new ImageData(picture.data, picture.width, picture.height), 0, 0);
}

/** The cells a field counts: not the ones cut by the image edge (shown for review only). */
const wholeCells = (cells) => cells.filter((c) => !c.at_edge);

function fieldCaption(r) {
  const whole = wholeCells(r.cells);
  const p = whole.filter((c) => c.prediction === C.labels.PARASITIZED).length;
  let text = `${whole.length} cells, ${p} parasitized`;
  const decided = whole.length;
  if (decided) text += `, parasitemia ${(100 * p / decided).toFixed(1)}%`;
  const edge = r.cells.length - whole.length;
  if (edge) text += `; ${edge} cut by the image edge to look at (not counted)`;
  if (r.warnings.length) text += `; NOT READABLE: ${r.warnings.join(';')}`;
  return text;
}

async function onPhoto(file) {
  $('field-result').hidden = false;
  $('field-caption').textContent = 'Finding cells...';
  $('add-field').disabled = true;
  try {
    const r = await classifyBlob(file, file.name || `field-${Date.now()}.jpg`);
    state.current = { ...r, photo: file };
    if (!wholeCells(r.cells).length) {
      $('field-caption').textContent = `No cells found in this ${r.width}x${r.height} picture (not a thin-smear field, or far out of focus).`;
      $('overlay').hidden = true;
      $('field-messages').replaceChildren(...r.quality.messages.map((m) => Object.assign(document.createElement('li'), { textContent: m })));
      return;
    }
    $('overlay').hidden = false;
    paint($('overlay'), drawOverlay(r, r.img, ownRanks(r.cells)));
    $('field-caption').textContent = `${fieldCaption(r)} (${(r.ms.total / 1000).toFixed(1)} s)`;
    $('field-messages').replaceChildren(...r.quality.messages.map((m) => Object.assign(document.createElement('li'), { textContent: m })));
    $('add-field').disabled = false;
  } catch (err) {
    $('field-caption').textContent = `Could not read this picture: ${err.message || err}`;
  }
}

// ------------------------------------------------------------------------------------------------------ the slide
function storedField(r) {
  return {
    name: r.name, photo: r.photo, width: r.width, height: r.height, diameter: r.diameter, warnings: r.warnings,
    messages: r.quality.messages,
    cells: r.cells.map((c) => ({ index: c.index, x: c.x, y: c.y, w: c.w, h: c.h, prob_parasitized: c.prob_parasitized,
      prediction: c.prediction, unfamiliar: c.unfamiliar, at_edge: c.at_edge, mask: c.region.mask })),
    latency_ms: r.ms.classify / Math.max(1, r.cells.length),
  };
}

/** The slide's rows with edge-classify's columns (FieldCell.to_row), path = the field's name in the slide. */
export function slideRows(slide) {
  return slide.fields.flatMap((f) => f.cells.map((c) => ({
    path: f.name, cell: c.index, x: c.x, y: c.y, w: c.w, h: c.h, at_edge: c.at_edge ? 1 : null, prediction: c.prediction,
    prob_parasitized: Math.round(c.prob_parasitized * 1e6) / 1e6, latency_ms: Math.round(f.latency_ms * 1e4) / 1e4,
    true_label: null, unfamiliar: c.unfamiliar === null ? null : Math.round(c.unfamiliar * 1e3) / 1e3,
    warnings: f.warnings.length ? f.warnings.join(';') : null, error: null,
  })));
}

function assess(slide) {
  const reviewed = Object.keys(slide.review || {}).length
    ? new Set(Object.entries(slide.review).filter(([, v]) => v === 'confirmed').map(([k]) => k)) : null;
  const u = state.card.unfamiliar;
  return assessSlide(slideRows(slide), state.card.slide_rule, {
    name: slide.name, reviewed, unfamiliarLimits: u ? [u.threshold, u.warn_fraction] : null,
  });
}

async function cropOf(slide, row) {
  const f = slide.fields.find((x) => x.name === row.path);
  const cell = f?.cells.find((c) => c.index === Number(row.cell));
  if (!cell) return null;
  const bitmap = await createImageBitmap(f.photo, { imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  const canvas = new OffscreenCanvas(cell.w, cell.h);
  const ctx = canvas.getContext('2d');
  ctx.drawImage(bitmap, -cell.x, -cell.y);
  bitmap.close();
  const pixels = ctx.getImageData(0, 0, cell.w, cell.h);
  for (let i = 0; i < cell.w * cell.h; i++) if (!cell.mask[i]) { pixels.data[4 * i] = 0; pixels.data[4 * i + 1] = 0; pixels.data[4 * i + 2] = 0; pixels.data[4 * i + 3] = 255; }
  ctx.putImageData(pixels, 0, 0);
  return canvas.convertToBlob({ type: 'image/png' });
}

const blobToDataUri = (blob) => new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(blob); });

async function showSlide(name) {
  const slide = await store.getSlide(name);
  const box = $('slide-result');
  if (!slide) { box.hidden = true; return; }
  box.hidden = false;
  const result = assess(slide);
  $('slide-title').textContent = `Slide ${slide.name}: ${slide.fields.length} field(s)`;
  $('slide-call').textContent = result.call;
  $('slide-call').className = `call call-${result.call.replace(/ /g, '-')}`;
  $('slide-call').dataset.value = result.call;
  $('slide-reason').textContent = result.reason;
  const pctText = (v) => (v === null ? 'n/a' : `${(100 * v).toFixed(2)}%`);
  const figures = [
    ['Cells examined', result.cells], ['Candidates for review', result.candidates],
    ['Parasitemia', pctText(result.parasitemia)],
    ['95% interval', result.parasitemia_ci ? `${pctText(result.parasitemia_ci[0])} to ${pctText(result.parasitemia_ci[1])}` : 'n/a'],
    ['Parasites per µL', result.parasites_per_ul === null ? 'n/a' : Math.round(result.parasites_per_ul).toLocaleString('en-US')],
    ['Detection limit', pctText(result.detection_limit)],
  ];
  $('slide-figures').replaceChildren(...figures.flatMap(([k, v]) => [Object.assign(document.createElement('dt'), { textContent: k }), Object.assign(document.createElement('dd'), { textContent: String(v) })]));
  $('slide-warnings').replaceChildren(...result.warnings.map((w) => Object.assign(document.createElement('li'), { textContent: w })));
  const list = $('candidates');
  list.replaceChildren();
  for (const row of result.candidate_list.slice(0, 60)) {
    const key = cellKey(row);
    const fig = document.createElement('figure');
    fig.className = `candidate ${slide.review?.[key] || ''}`;
    fig.dataset.rank = row.rank;
    const img = document.createElement('img');
    img.alt = `candidate ${row.rank}`;
    cropOf(slide, row).then((b) => { if (b) img.src = URL.createObjectURL(b); });
    const cap = document.createElement('figcaption');
    cap.textContent = `#${row.rank} p=${Number(row.prob_parasitized).toFixed(2)} ${row.path} cell ${row.cell}`
      + (isEdge(row) ? ' (cut by the image edge, not counted)' : '') + (isLeftOut(row) ? ' (field left out, not counted)' : '');
    const mark = (verdict) => async () => {
      const s = await store.getSlide(name);
      s.review = s.review || {};
      if (s.review[key] === verdict) delete s.review[key]; else s.review[key] = verdict;
      await store.putSlide(s);
      await showSlide(name);
    };
    const yes = Object.assign(document.createElement('button'), { textContent: 'Parasite', className: 'confirm' });
    yes.onclick = mark('confirmed');
    const no = Object.assign(document.createElement('button'), { textContent: 'Not a parasite', className: 'reject' });
    no.onclick = mark('rejected');
    fig.append(img, cap, yes, no);
    list.append(fig);
  }
}

async function refreshSlides(selected) {
  const slides = await store.listSlides();
  const sel = $('slides');
  sel.replaceChildren(...slides.map((s) => Object.assign(document.createElement('option'), { value: s.name, textContent: `${s.name} (${s.fields.length})` })));
  if (selected) sel.value = selected;
  if (sel.value) await showSlide(sel.value); else $('slide-result').hidden = true;
}

function download(blob, name) {
  const a = Object.assign(document.createElement('a'), { href: URL.createObjectURL(blob), download: name });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function buildReport(name) {
  const slide = await store.getSlide(name);
  const result = assess(slide);
  const crops = new Map();
  for (const row of result.candidate_list.slice(0, 60)) {
    const b = await cropOf(slide, row);
    if (b) crops.set(cellKey(row), await blobToDataUri(b));
  }
  const overlays = [];
  for (const f of slide.fields) {
    const img = await decodeImage(f.photo);
    const ranks = new Map(result.candidate_list.filter((r) => r.path === f.name).map((r) => [Number(r.cell), r.rank]));
    const cells = f.cells.map((c) => ({ ...c, region: { mask: c.mask } }));
    const pic = drawOverlay({ name: f.name, cells }, img, ranks);
    let canvas = new OffscreenCanvas(pic.width, pic.height);
    canvas.getContext('2d').putImageData(new ImageData(pic.data, pic.width, pic.height), 0, 0);
    const width = C.report.OVERLAY_WIDTH;
    if (pic.width > width) {
      const small = new OffscreenCanvas(width, Math.round(pic.height * width / pic.width));
      small.getContext('2d').drawImage(canvas, 0, 0, small.width, small.height);
      canvas = small;
    }
    const sorted = [...ranks.values()].sort((a, b) => a - b);
    overlays.push({ field: f.name, name: f.name, caption: `${wholeCells(f.cells).length} cells; candidates ${sorted.map((v) => `#${v}`).join(', ') || 'none'}`,
      src: await blobToDataUri(await canvas.convertToBlob({ type: 'image/jpeg', quality: 0.82 })) });
  }
  const data = reportData([slideData(result, 0, { overlays, crops })], { modelName: state.card.name, modelSha256: C.model.sha256, version: `${C.version} (phone)`,
    provenance: state.card.provenance });
  return renderReport(data);
}

function wire() {
  $('photo').addEventListener('change', (e) => { const f = e.target.files?.[0]; if (f) onPhoto(f); });
  $('add-field').addEventListener('click', async () => {
    const name = $('slide-name').value.trim();
    if (!name) { $('slide-name').focus(); $('slide-name').placeholder = 'type the slide name first'; return; }
    if (!state.current || !wholeCells(state.current.cells).length) return;
    await store.addField(name, storedField(state.current));
    $('add-field').disabled = true;
    await refreshSlides(name);
  });
  $('slides').addEventListener('change', () => showSlide($('slides').value));
  $('export-csv').addEventListener('click', async () => {
    const slide = await store.getSlide($('slides').value);
    if (slide) download(new Blob([rowsToCsv(slideRows(slide))], { type: 'text/csv' }), `${slide.name}_cells.csv`);
  });
  $('export-zip').addEventListener('click', async () => {
    const slide = await store.getSlide($('slides').value);
    if (!slide) return;
    const files = [];
    for (const [key, verdict] of Object.entries(slide.review || {})) {
      const [path, cell] = [key.slice(0, key.lastIndexOf('#')), key.slice(key.lastIndexOf('#') + 1)];
      const b = await cropOf(slide, { path, cell });
      if (!b) continue;
      const folder = verdict === 'confirmed' ? 'Parasitized' : 'Uninfected';
      files.push({ name: `${folder}/${cropName(`${slide.name}_${path}`, cell)}`, bytes: new Uint8Array(await b.arrayBuffer()) });
    }
    download(new Blob([zip(files)], { type: 'application/zip' }), `${slide.name}_reviewed_cells.zip`);
  });
  $('show-report').addEventListener('click', async () => {
    const name = $('slides').value;
    if (!name) return;
    const html = await buildReport(name);
    download(new Blob([html], { type: 'text/html' }), `${name}_report.html`);
    $('report-frame').hidden = false;
    $('report-frame').srcdoc = html;
  });
  $('delete-slide').addEventListener('click', async () => {
    const name = $('slides').value;
    if (name && confirm(`Delete slide ${name} from this phone?`)) { await store.deleteSlide(name); await refreshSlides(); }
  });
  void CELL_COLUMNS;
}

async function registerWorker() {
  if (!('serviceWorker' in navigator) || !window.isSecureContext) {
    $('offline').textContent = 'Offline use needs https or localhost: this page works while the server is reachable.';
    return;
  }
  try {
    const list = await (await fetch('vendor/precache.json', { cache: 'no-cache' })).json();
    await navigator.serviceWorker.register(`sw.js?v=${encodeURIComponent(list.version)}`);
    await navigator.serviceWorker.ready;
    // The runtime wasm this browser picked (relaxed SIMD or not) joins the offline copy: the service worker may
    // not have been in control yet when it was fetched.
    await ready;
    const used = performance.getEntriesByType('resource').map((e) => new URL(e.name))
      .filter((u) => u.origin === location.origin && list.lazy.some((f) => u.pathname.endsWith(`/${f}`)));
    const cache = await caches.open(`malaria-edge-${list.version}`);
    for (const u of used) if (!(await cache.match(u.pathname))) await cache.add(u.pathname);
    $('offline').textContent = `Kept on this phone for offline use (version ${list.version}).`;
  } catch (err) {
    if (!navigator.serviceWorker.controller) $('offline').textContent = `Offline copy not made: ${err.message || err}`;
  }
}

wire();
refreshSlides().catch(() => {});
registerWorker();
