// Is this field readable? A port of edge_runtime/quality.py: the cell diameter at any magnification
// (measureCellDiameter) and the field quality gate (assessField -> {ok, warnings, messages, metrics}).
import { cv, f32, median, median32, percentile, pyRound, toMat, withMats } from './cvutil.mjs';
import { loadConstants } from './constants.mjs';
import { circles, clean, disk, estimateDiameter, fillHoles, foregroundMask, resizeRgb, stainDensity } from './segment.mjs';

const { quality: Q, segment: S } = loadConstants();

const sideScale = (img, side) => Math.min(1.0, side / Math.max(img.width, img.height));

function blobDiameter(img, scale) {
  const small = resizeRgb(img, scale);
  const { width: w, height: h } = small;
  const density = stainDensity(small);
  let mask = foregroundMask(density, small);
  mask = clean(mask, w, h, 1.5);
  mask = fillHoles(mask, w, h, 0.02 * mask.length);
  const blobs = estimateDiameter(mask, w, h);
  return blobs == null ? null : blobs / scale;
}

function rimDiameter(img, scale, maxRadius) {
  const small = resizeRgb(img, scale);
  const { width: w, height: h } = small;
  const density = stainDensity(small);
  const side = Math.max(w, h) / 8.0;
  const top = maxRadius == null ? side : Math.min(maxRadius, side);
  const found = circles(density, w, h, 3, top, 4, S.SIZE_CIRCLE_PERFECTNESS);
  const n = found.length / 3;
  if (n < 3) return [null, scale >= 1.0];
  const radii = []; let disks = 0;
  for (let i = 0; i < n; i++) { radii.push(found[3 * i + 2]); disks = f32(disks + f32(f32(Math.PI) * f32(found[3 * i + 2] ** 2))); }
  const diameterSmall = 2.0 * median32(radii);
  const fg = foregroundMask(density, small);
  let stained = 0; for (const v of fg) stained += v;
  const cover = disks / Math.max(1, stained);
  const resolved = diameterSmall >= Q.RIM_MIN_PIXELS && cover >= Q.RIM_MIN_COVER;
  return [diameterSmall / scale, resolved];
}

function combine(blobs, rims) {
  if (rims != null && (blobs == null || !(1.0 / S.DIAMETER_AGREEMENT <= blobs / rims && blobs / rims <= S.DIAMETER_AGREEMENT))) return rims;
  return blobs;
}

/** quality.measure_cell_diameter: the red-cell diameter in the field's pixels, or null. */
export function measureCellDiameter(img) {
  let blobScale = sideScale(img, Q.FIRST_BLOB_SIDE);
  let rimScale = sideScale(img, Q.FIRST_RIM_SIDE);
  let diameter = null; let maxRadius = null;
  for (let pass = 0; pass < Q.MAX_PASSES; pass++) {
    const [rims, resolved] = rimDiameter(img, rimScale, maxRadius);
    diameter = combine(blobDiameter(img, blobScale), rims);
    if (resolved || rimScale >= 1.0) break;
    blobScale = Math.min(1.0, 2.0 * blobScale); rimScale = Math.min(1.0, 2.0 * rimScale);
    maxRadius = Q.REFINE_MAX_RADIUS;
  }
  return diameter;
}

function blur(src, w, h, sigma) {
  const c = cv();
  return withMats((k) => {
    const m = k(toMat(src, h, w, c.CV_32F)); const out = k(new c.Mat());
    c.GaussianBlur(m, out, new c.Size(0, 0), sigma);
    return out.data32F.slice();
  });
}

function bandEnergy(density, where, w, h, fine, coarse) {
  const low = blur(density, w, h, coarse);
  const high = fine <= 0 ? density : blur(density, w, h, fine);
  let sum = 0; let n = 0;
  for (let i = 0; i < density.length; i++) if (where[i]) { const b = f32(high[i] - low[i]); sum += b * b; n++; }
  return n ? sum / n : 0.0;
}

function gradient(density, w, h, sigma) {
  const c = cv();
  return withMats((k) => {
    const m = k(toMat(density, h, w, c.CV_32F)); const s = k(new c.Mat());
    c.GaussianBlur(m, s, new c.Size(0, 0), sigma);
    const gx = k(new c.Mat()); const gy = k(new c.Mat());
    c.Sobel(s, gx, c.CV_32F, 1, 0, 3); c.Sobel(s, gy, c.CV_32F, 0, 1, 3);
    const x = gx.data32F.slice(); const y = gy.data32F.slice();
    const out = new Float32Array(x.length);
    for (let i = 0; i < out.length; i++) {
      const a = f32(x[i] / 8); const b = f32(y[i] / 8);
      out[i] = Math.sqrt(f32(f32(a * a) + f32(b * b)));
    }
    return out;
  });
}

/** quality.edge_blur */
export function edgeBlur(density, w, h, diameter) {
  const c = cv();
  const s1 = Math.max(0.5, Q.FOCUS_FINE * diameter); const s2 = Math.max(0.5, Q.FOCUS_MID * diameter);
  const g1 = gradient(density, w, h, s1); const g2 = gradient(density, w, h, s2);
  const dil = withMats((k) => {
    const m = k(toMat(g2, h, w, c.CV_32F)); const ones = k(c.Mat.ones(3, 3, c.CV_8U)); const out = k(new c.Mat());
    c.dilate(m, out, ones);
    return out.data32F.slice();
  });
  const level = f32(percentile(g2, Q.EDGE_PERCENTILE));
  const sigma2 = [];
  const floor = f32(1.0 + 1e-4);
  for (let i = 0; i < g2.length; i++) {
    if (!(g2[i] >= dil[i] && g2[i] > level)) continue;
    const ratio = f32(g1[i] / Math.max(g2[i], f32(1e-9)));
    if (!(ratio > floor)) continue;
    const r2 = f32(ratio * ratio);
    sigma2.push(f32(f32(f32(s2 * s2) - f32(f32(r2 * s1) * s1)) / f32(r2 - 1.0)));
  }
  if (sigma2.length < Q.MIN_EDGE_PIXELS) return NaN;
  return Math.sqrt(Math.max(median32(sigma2), 0.0)) * Q.FOCUS_DIAMETER / diameter;
}

function greyOf(data, i) { return (data[3 * i] + data[3 * i + 1] + data[3 * i + 2]) / 3; }
function topOf(data, i) { return Math.max(data[3 * i], data[3 * i + 1], data[3 * i + 2]); }

/** quality.clear_fraction */
export function clearFraction(img) {
  const n = img.width * img.height;
  const lit = [];
  for (let i = 0; i < n; i++) if (topOf(img.data, i) > Q.BLACK_LEVEL) lit.push(greyOf(img.data, i));
  if (!lit.length) return 0.0;
  const sorted = Float64Array.from(lit).sort();
  const level = Q.CLEAR_LEVEL * percentile(sorted, 99.5, true);
  let clear = 0; for (const g of lit) if (g >= level) clear++;
  return clear / lit.length;
}

/** quality.field_metrics */
export function fieldMetrics(img, cells, diameter) {
  const H = img.height; const W = img.width;
  const metrics = {
    diameter: diameter ? diameter : NaN, cells: cells.length,
    cell_median_diameter: cells.length ? median(cells.map((c) => Math.sqrt(4.0 * c.area / Math.PI))) : NaN,
  };
  const d = diameter && diameter >= 6 ? diameter : Math.max(H, W) / 20.0;
  const scale = Math.min(1.0, Q.FOCUS_DIAMETER / d);
  const small = resizeRgb(img, scale);
  const dSmall = d * scale;
  const { width: w, height: h } = small;
  const density = stainDensity(small);
  const stained = foregroundMask(density, small);
  const c = cv();
  const near = withMats((k) => {
    const m = k(toMat(stained, h, w, c.CV_8U)); const kernel = k(disk(Math.max(1.0, 0.1 * dSmall))); const out = k(new c.Mat());
    c.dilate(m, out, kernel);
    return out.data.slice();
  });
  const fine = Math.max(0.5, Q.FOCUS_FINE * dSmall); const mid = Math.max(0.5, Q.FOCUS_MID * dSmall);
  const coarse = Math.max(0.5, Q.FOCUS_COARSE * dSmall);
  const base = bandEnergy(density, near, w, h, mid, coarse);
  metrics.edge_blur = edgeBlur(density, w, h, dSmall);
  metrics.focus = base > 0 ? bandEnergy(density, near, w, h, fine, mid) / base : NaN;
  if (Number.isNaN(metrics.edge_blur)) metrics.edge_blur = Infinity;
  // exposure_metrics on the glass: well clear of any stain.
  const n = w * h; let nLit = 0; let bright = 0; let dark = 0; const glassGrey = [];
  for (let i = 0; i < n; i++) {
    const top = topOf(small.data, i);
    const lit = top > Q.BLACK_LEVEL;
    if (lit) { nLit++; if (top >= Q.CLIPPED_BRIGHT) bright++; if (!near[i]) glassGrey.push(greyOf(small.data, i)); }
    if (top <= Q.CLIPPED_DARK) dark++;
  }
  const lit1 = Math.max(1, nLit);
  metrics.glass_brightness = glassGrey.length ? median(glassGrey) : NaN;
  metrics.clipped_bright = bright / lit1;
  metrics.clipped_dark = dark / Math.max(1, n);
  metrics.glass_fraction = glassGrey.length / lit1;
  let nStained = 0; for (const v of stained) nStained += v;
  metrics.stained_fraction = nStained / lit1;
  const cellArea = cells.reduce((a, cell) => a + cell.area, 0) * (h / H) ** 2;
  metrics.cell_cover = cellArea / Math.max(1, nStained);
  metrics.clear_fraction = clearFraction(small);
  return metrics;
}

/** Python's str.format for the specs the messages use: {name:.Nf}, {name:.N%}, {name}. */
export function formatMessage(template, values) {
  return template.replace(/\{(\w+)(?::\.(\d+)([f%]))?\}/g, (_, name, digits, kind) => {
    const v = values[name];
    if (kind === 'f') return Number(v).toFixed(Number(digits));
    if (kind === '%') return `${(100 * Number(v)).toFixed(Number(digits))}%`;
    return String(v);
  });
}

function sizeProblem(m, expected) {
  const d = m.diameter;
  if (Number.isNaN(d)) return 'no cell size could be measured';
  if (d < Q.MIN_READABLE_DIAMETER) return `below ${Q.MIN_READABLE_DIAMETER.toFixed(0)} px`;
  if (expected && !(1.0 / Q.CELL_SIZE_TOLERANCE <= d / expected && d / expected <= Q.CELL_SIZE_TOLERANCE)) return `expected about ${expected.toFixed(0)} px`;
  const kept = m.cell_median_diameter;
  if (!Number.isNaN(kept) && m.cells >= Q.MIN_CELLS && !(1.0 / Q.SEGMENTED_SIZE_TOLERANCE <= kept / d && kept / d <= Q.SEGMENTED_SIZE_TOLERANCE)) {
    return `the cells kept measure ${kept.toFixed(0)} px`;
  }
  return null;
}

/** quality.judge: {ok, warnings, messages, metrics}. */
export function judge(m, expectedDiameter = null) {
  const thick = m.stained_fraction > Q.THICK_STAINED_FRACTION || m.clear_fraction < Q.THICK_CLEAR_FRACTION;
  if (thick) return { ok: false, warnings: ['thick_smear'], messages: [formatMessage(Q.MESSAGES.thick_smear, m)], metrics: m };
  const found = [];
  if (m.cells < Q.MIN_CELLS) found.push(['too_few_cells', {}]);
  if (m.edge_blur > Q.FOCUS_MAX_BLUR && m.cells >= 1) found.push(['out_of_focus', { limit: Q.FOCUS_MAX_BLUR }]);
  if (m.glass_brightness < Q.GLASS_DARK || m.clipped_dark > Q.CLIPPED_DARK_MAX) found.push(['under_exposed', {}]);
  if (m.clipped_bright > Q.CLIPPED_BRIGHT_MAX) found.push(['over_exposed', {}]);
  const reason = sizeProblem(m, expectedDiameter);
  if (reason) found.push(['cell_size', { reason }]);
  return {
    ok: !found.length, warnings: found.map(([code]) => code),
    messages: found.map(([code, extra]) => formatMessage(Q.MESSAGES[code], { ...m, ...extra })), metrics: m,
  };
}

export function assessField(img, cells, diameter, expectedDiameter = null) {
  return judge(fieldMetrics(img, cells, diameter), expectedDiameter);
}
