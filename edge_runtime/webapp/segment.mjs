// The red cells of a thin-smear field: a step-by-step port of edge_runtime/segment.py to OpenCV.js, with the
// same constants (constants.json, written from the Python modules) and the same OpenCV calls in the same order,
// so a field gives the same boxes on the phone as in edge-classify. Numbers inside a Python function body are
// repeated here next to the name of that function. Images are {width, height, data: Uint8Array RGB}.
import { cv, f32, median, median32, pyRound, take, toMat, withMats } from './cvutil.mjs';
import { loadConstants } from './constants.mjs';

const { segment: S } = loadConstants();

/** cv2.resize(rgb, round(w*scale) x round(h*scale), INTER_AREA); the image itself when scale >= 1. */
export function resizeRgb(img, scale) {
  if (scale >= 1) return img;
  const c = cv();
  const w = Math.max(1, pyRound(img.width * scale));
  const h = Math.max(1, pyRound(img.height * scale));
  return withMats((k) => {
    const src = k(toMat(img.data, img.height, img.width, c.CV_8UC3));
    const dst = k(new c.Mat());
    c.resize(src, dst, new c.Size(w, h), 0, 0, c.INTER_AREA);
    return { width: w, height: h, data: dst.data.slice() };
  });
}

export function disk(radius) {
  const c = cv();
  const r = Math.max(1, pyRound(radius));
  return c.getStructuringElement(c.MORPH_ELLIPSE, new c.Size(2 * r + 1, 2 * r + 1));
}


/** cv2.dilate(src, disk(radius)) for a float32 or uint8 array: the same values (a maximum is exact), computed
 * as the maximum over the ellipse's rows of a running maximum along each row (van Herk / Gil-Werman), which in
 * wasm is ~10x faster than OpenCV.js's dilate with a large kernel. Outside the image counts as -infinity, as
 * OpenCV's default border for dilation. */
export function dilateDisk(src, w, h, radius) {
  const c = cv();
  const kernel = take(disk(radius));
  const size = Math.round(Math.sqrt(kernel.length));
  const r = (size - 1) / 2;
  const out = new (src.constructor)(src.length).fill(src instanceof Float32Array ? -Infinity : 0);
  const rowMax = new Map();
  const runMax = (half) => {
    if (rowMax.has(half)) return rowMax.get(half);
    const res = new (src.constructor)(src.length);
    const width = 2 * half + 1;
    const g = new Float64Array(w + width); const hh = new Float64Array(w + width);
    for (let y = 0; y < h; y++) {
      const base = y * w;
      const n = w + 2 * half;
      const at = (i) => { const x = i - half; return x >= 0 && x < w ? src[base + x] : -Infinity; };
      for (let i = 0; i < n; i++) g[i] = i % width === 0 ? at(i) : Math.max(g[i - 1], at(i));
      for (let i = n - 1; i >= 0; i--) hh[i] = (i % width === width - 1 || i === n - 1) ? at(i) : Math.max(hh[i + 1], at(i));
      for (let x = 0; x < w; x++) res[base + x] = Math.max(hh[x], g[x + width - 1]);
    }
    rowMax.set(half, res);
    return res;
  };
  for (let dy = -r; dy <= r; dy++) {
    const row = kernel.subarray((dy + r) * size, (dy + r + 1) * size);
    let first = -1; let last = -1;
    for (let i = 0; i < size; i++) if (row[i]) { if (first < 0) first = i; last = i; }
    if (first < 0) continue;
    if (first - r !== -(last - r)) throw new Error('dilateDisk: kernel row not symmetric');
    const m = runMax(r - first);
    for (let y = Math.max(0, -dy); y < Math.min(h, h - dy); y++) {
      const o = y * w; const s = (y + dy) * w;
      for (let x = 0; x < w; x++) if (m[s + x] > out[o + x]) out[o + x] = m[s + x];
    }
  }
  void c;
  return out;
}

/** segment.glass_level: the bright glass level of one float32 channel. */
function glassLevel(channel, w, h) {
  const c = cv();
  const tile = Math.max(8, pyRound(Math.max(h, w) / 24));
  return withMats((k) => {
    const src = k(toMat(channel, h, w, c.CV_32F));
    const small = k(new c.Mat());
    c.resize(src, small, new c.Size(Math.max(1, Math.floor(w / tile)), Math.max(1, Math.floor(h / tile))), 0, 0,
      c.INTER_AREA);
    const ones = k(c.Mat.ones(3, 3, c.CV_8U));
    const bg = k(new c.Mat());
    c.dilate(small, bg, ones);
    const blur = k(new c.Mat());
    c.GaussianBlur(bg, blur, new c.Size(0, 0), 1.5);
    const out = k(new c.Mat());
    c.resize(blur, out, new c.Size(w, h), 0, 0, c.INTER_LINEAR);
    return out.data32F.slice();
  });
}

/** segment.channel_densities: float32 optical density of each channel (red, green, blue) over its glass level. */
export function channelDensities(img) {
  const { width: w, height: h, data } = img;
  const n = w * h;
  const out = [];
  const channel = new Float32Array(n);
  for (let ch = 0; ch < 3; ch++) {
    for (let i = 0; i < n; i++) channel[i] = data[3 * i + ch] + 1;
    const bg = glassLevel(channel, w, h);
    const od = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const v = channel[i];
      od[i] = f32(Math.log(f32(Math.max(bg[i], v) / v)));
    }
    out.push(od);
  }
  return out;
}

/** segment.stain_density: float32 optical density, the largest of the three channels (``channels`` when the
 * caller has them). */
export function stainDensity(img, channels = null) {
  const [r, g, b] = channels ?? channelDensities(img);
  const density = new Float32Array(r.length);
  for (let i = 0; i < r.length; i++) density[i] = Math.max(r[i], g[i], b[i]);
  return density;
}

/** segment.pigment_mask: Uint8Array 0/1, brown (hemozoin) pixels: blue absorbed more than red by PIGMENT_OD. */
export function pigmentMask(channels) {
  const [r, , b] = channels;
  const level = f32(S.PIGMENT_OD);
  const out = new Uint8Array(r.length);
  for (let i = 0; i < r.length; i++) out[i] = f32(b[i] - r[i]) > level ? 1 : 0;
  return out;
}

function otsuLevel(values, rows, cols) {
  const c = cv();
  const scaled = new Uint8Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = f32(values[i] * 255);
    scaled[i] = v <= 0 ? 0 : v >= 255 ? 255 : Math.trunc(v);
  }
  return withMats((k) => {
    const m = k(toMat(scaled, rows, cols, c.CV_8U));
    const dst = k(new c.Mat());
    return c.threshold(m, dst, 0, 255, c.THRESH_BINARY + c.THRESH_OTSU) / 255.0;
  });
}

/** segment.threshold_map */
export function thresholdMap(density, w, h) {
  const c = cv();
  const whole = Math.max(otsuLevel(density, h, w), S.MIN_DENSITY);
  const tile = S.LOCAL_TILE_CELLS * S.WORK_DIAMETER;
  const rows = Math.max(1, pyRound(h / tile));
  const cols = Math.max(1, pyRound(w / tile));
  const grid = new Float32Array(rows * cols).fill(whole);
  const level = f32(2 * S.MIN_DENSITY);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      const y0 = Math.floor(i * h / rows); const y1 = Math.floor((i + 1) * h / rows);
      const x0 = Math.floor(j * w / cols); const x1 = Math.floor((j + 1) * w / cols);
      const part = new Float32Array((y1 - y0) * (x1 - x0));
      let p = 0; let stained = 0;
      for (let y = y0; y < y1; y++) {
        for (let x = x0; x < x1; x++) {
          const v = density[y * w + x];
          part[p++] = v;
          if (v > level) stained++;
        }
      }
      const share = stained / part.length;
      if (share > 0.1 && share < 0.95) grid[i * cols + j] = Math.min(whole, otsuLevel(part, y1 - y0, x1 - x0));
    }
  }
  const minimum = f32(S.MIN_DENSITY);
  if (rows === 1 && cols === 1) return new Float32Array(w * h).fill(Math.max(grid[0], S.MIN_DENSITY));
  const out = withMats((k) => {
    const g = k(toMat(grid, rows, cols, c.CV_32F));
    const big = k(new c.Mat());
    c.resize(g, big, new c.Size(w, h), 0, 0, c.INTER_LINEAR);
    return big.data32F.slice();
  });
  for (let i = 0; i < out.length; i++) if (out[i] < minimum) out[i] = minimum;
  return out;
}

/** segment.foreground_mask: Uint8Array 0/1 (``tmap``: the threshold map when the caller has it). */
export function foregroundMask(density, img, tmap = null) {
  tmap = tmap ?? thresholdMap(density, img.width, img.height);
  const { data } = img;
  const mask = new Uint8Array(density.length);
  for (let i = 0; i < mask.length; i++) {
    const top = Math.max(data[3 * i], data[3 * i + 1], data[3 * i + 2]);
    mask[i] = density[i] > tmap[i] && top > S.BLACK_LEVEL ? 1 : 0;
  }
  return mask;
}

export function clean(mask, w, h, radius) {
  const c = cv();
  return withMats((k) => {
    const m = k(toMat(mask, h, w, c.CV_8U));
    const kernel = k(disk(radius));
    const out = k(new c.Mat());
    c.morphologyEx(m, out, c.MORPH_OPEN, kernel);
    return out.data.slice();
  });
}

/** Connected components with stats: {count, labels Int32Array, stats Int32Array (count x 5)}. */
export function components(mask, w, h, connectivity) {
  const c = cv();
  return withMats((k) => {
    const m = k(toMat(mask, h, w, c.CV_8U));
    const labels = k(new c.Mat()); const stats = k(new c.Mat()); const cent = k(new c.Mat());
    const count = c.connectedComponentsWithStats(m, labels, stats, cent, connectivity, c.CV_32S);
    return { count, labels: labels.data32S.slice(), stats: stats.data32S.slice() };
  });
}

/** The bool window (Uint8Array, ww x wh) of ``label`` in a labels array of width w at (x, y). */
function windowOf(labels, w, x, y, ww, wh, label) {
  const out = new Uint8Array(ww * wh);
  for (let yy = 0; yy < wh; yy++) for (let xx = 0; xx < ww; xx++) out[yy * ww + xx] = labels[(y + yy) * w + x + xx] === label ? 1 : 0;
  return out;
}

function countOn(a) { let n = 0; for (const v of a) if (v) n++; return n; }

/** The convex hull (a Mat kept by ``k``) of the largest outer contour of a 0/1 CV_8U Mat. */
function largestHull(k, m, method) {
  const c = cv();
  const contours = k(new c.MatVector()); const hier = k(new c.Mat());
  c.findContours(m, contours, hier, c.RETR_EXTERNAL, method);
  let best = -1; let bestArea = -1;
  for (let i = 0; i < contours.size(); i++) {
    const contour = contours.get(i);
    const a = c.contourArea(contour);
    contour.delete();
    if (a > bestArea) { bestArea = a; best = i; }
  }
  const hull = k(new c.Mat());
  c.convexHull(k(contours.get(best)), hull, false, true);
  return hull;
}

/** segment.solidity: the share of its convex hull that a region (0/1 window ww x wh) fills. */
export function solidity(window, ww, wh) {
  const c = cv();
  return withMats((k) => {
    const hull = largestHull(k, k(toMat(window, wh, ww, c.CV_8U)), c.CHAIN_APPROX_NONE);
    return countOn(window) / Math.max(1.0, c.contourArea(hull));
  });
}

/** segment.is_one_cell: a region too big for one normal cell is one enlarged cell (round, no waist). */
export function isOneCell(window, ww, wh) {
  const c = cv();
  const padded = new Uint8Array((ww + 2) * (wh + 2));
  for (let yy = 0; yy < wh; yy++) for (let xx = 0; xx < ww; xx++) padded[(yy + 1) * (ww + 2) + xx + 1] = window[yy * ww + xx];
  const inner = maxOf(distanceMap(padded, ww + 2, wh + 2));
  const fill = countOn(window) / Math.max(1.0, Math.PI * inner * inner);
  return fill <= S.ONE_CELL_FILL && solidity(window, ww, wh) >= S.ONE_CELL_SOLIDITY;
}

/** segment.fill_holes (holes up to ``roundMaxArea`` filled when round). */
export function fillHoles(mask, w, h, maxArea, roundMaxArea = 0.0) {
  const inverse = mask.map((v) => (v ? 0 : 1));
  const { count, labels, stats } = components(inverse, w, h, 4);
  const fill = new Uint8Array(count);
  for (let l = 1; l < count; l++) {
    const [x, y, bw, bh, area] = stats.subarray(5 * l, 5 * l + 5);
    const touches = x === 0 || y === 0 || x + bw === w || y + bh === h;
    fill[l] = !touches && area <= maxArea ? 1 : 0;
    if (!touches && area > maxArea && area <= roundMaxArea) {
      fill[l] = solidity(windowOf(labels, w, x, y, bw, bh, l), bw, bh) >= S.ROUND_HOLE_SOLIDITY ? 1 : 0;
    }
  }
  const out = new Uint8Array(mask.length);
  for (let i = 0; i < out.length; i++) out[i] = mask[i] || fill[labels[i]] ? 1 : 0;
  return out;
}

/** segment.fill_broken_rims: ``mask`` with the round holes of ``raw`` (the stain before the opening) filled where
 * the opening broke one cell's rim (the hole and the stain touching it within 2 px up to ENLARGED_AREA). */
export function fillBrokenRims(mask, raw, w, h, diameter) {
  const cellArea = Math.PI * diameter * diameter / 4.0;
  const hole = components(raw.map((v) => (v ? 0 : 1)), w, h, 4);
  const candidates = [];
  for (let l = 1; l < hole.count; l++) {
    const [x, y, bw, bh, area] = hole.stats.subarray(5 * l, 5 * l + 5);
    const inside = x > 0 && y > 0 && x + bw < w && y + bh < h;
    if (inside && area >= S.RIM_HOLE_AREA * cellArea && area <= S.ROUND_HOLE_AREA * cellArea) candidates.push(l);
  }
  if (candidates.length === 0) return mask;
  const part = components(mask, w, h, 8);
  const out = mask.slice();
  for (const l of candidates) {
    const [x, y, bw, bh, area] = hole.stats.subarray(5 * l, 5 * l + 5);
    let filled = false;
    for (let yy = y; yy < y + bh && !filled; yy++) {
      for (let xx = x; xx < x + bw; xx++) if (hole.labels[yy * w + xx] === l && mask[yy * w + xx]) { filled = true; break; }
    }
    if (filled || solidity(windowOf(hole.labels, w, x, y, bw, bh, l), bw, bh) < S.ROUND_HOLE_SOLIDITY) continue;
    const touching = new Set();
    for (let yy = y; yy < y + bh; yy++) {
      for (let xx = x; xx < x + bw; xx++) {
        if (hole.labels[yy * w + xx] !== l) continue;
        for (let ny = Math.max(0, yy - 2); ny <= Math.min(h - 1, yy + 2); ny++) {
          for (let nx = Math.max(0, xx - 2); nx <= Math.min(w - 1, xx + 2); nx++) {
            const p = part.labels[ny * w + nx];
            if (p > 0) touching.add(p);
          }
        }
      }
    }
    let total = area;
    for (const p of touching) total += part.stats[5 * p + 4];
    if (touching.size === 0 || total > S.ENLARGED_AREA * cellArea) continue;
    for (let yy = y; yy < y + bh; yy++) {
      for (let xx = x; xx < x + bw; xx++) if (hole.labels[yy * w + xx] === l) out[yy * w + xx] = 1;
    }
  }
  return out;
}

/** segment.estimate_diameter */
export function estimateDiameter(mask, w, h) {
  const c = cv();
  return withMats((k) => {
    const m = k(toMat(mask, h, w, c.CV_8U));
    const contours = k(new c.MatVector()); const hier = k(new c.Mat());
    c.findContours(m, contours, hier, c.RETR_EXTERNAL, c.CHAIN_APPROX_SIMPLE);
    const singles = []; const all = [];
    for (let i = 0; i < contours.size(); i++) {
      const contour = contours.get(i);
      const area = c.contourArea(contour);
      if (area < 30) { contour.delete(); continue; }
      const r = c.boundingRect(contour);
      if (r.x === 0 || r.y === 0 || r.x + r.width === w || r.y + r.height === h) { contour.delete(); continue; }
      const diameter = Math.sqrt(4.0 * area / Math.PI);
      all.push(diameter);
      const hull = new c.Mat();
      c.convexHull(contour, hull, false, true);
      const hullArea = c.contourArea(hull);
      hull.delete(); contour.delete();
      if (hullArea > 0 && area / hullArea > 0.93 && Math.max(r.width, r.height) <= 1.3 * Math.min(r.width, r.height)) {
        singles.push(diameter);
      }
    }
    if (singles.length >= 3) return median(singles);
    if (all.length) return median(all);
    return null;
  });
}

function distanceMap(mask, w, h) {
  const c = cv();
  return withMats((k) => {
    const m = k(toMat(mask, h, w, c.CV_8U));
    const d = k(new c.Mat());
    c.distanceTransform(m, d, c.DIST_L2, 5);
    return d.data32F.slice();
  });
}

/** segment.markers: distance-map peaks as Int32 labels and their count. */
function markers(distance, w, h, diameter) {
  const c = cv();
  const radius = diameter / 2.0;
  return withMats((k) => {
    const d = k(toMat(distance, h, w, c.CV_32F));
    const smooth = k(new c.Mat());
    c.GaussianBlur(d, smooth, new c.Size(0, 0), Math.max(1.0, radius / 8.0));
    const s = smooth.data32F.slice();
    const dl = dilateDisk(s, w, h, radius * 0.55);
    const floor = f32(radius * 0.35);
    const peaks = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) peaks[i] = s[i] >= dl[i] && s[i] > floor ? 1 : 0;
    const pm = k(toMat(peaks, h, w, c.CV_8U));
    const kernel2 = k(disk(Math.max(1.0, radius * 0.2)));
    const grown = k(new c.Mat());
    c.dilate(pm, grown, kernel2);
    const labels = k(new c.Mat());
    const count = c.connectedComponents(grown, labels, 8, c.CV_32S);
    return { labels: labels.data32S.slice(), count: count - 1 };
  });
}

/** segment.circles: Float32Array of (x, y, r) triples. */
export function circles(density, w, h, minRadius, maxRadius, minDistance, perfectness = S.CIRCLE_PERFECTNESS) {
  const c = cv();
  const picture = new Uint8Array(density.length);
  for (let i = 0; i < density.length; i++) {
    const v = f32(density[i] * 400);
    picture[i] = v <= 0 ? 0 : v >= 255 ? 255 : Math.trunc(v);
  }
  return withMats((k) => {
    const p = k(toMat(picture, h, w, c.CV_8U));
    const blur = k(new c.Mat());
    c.GaussianBlur(p, blur, new c.Size(0, 0), Math.max(1.0, minRadius / 9.0));
    const found = k(new c.Mat());
    c.HoughCircles(blur, found, c.HOUGH_GRADIENT_ALT, 1.5, Math.max(1.0, minDistance), 60, perfectness,
      Math.max(1, Math.trunc(minRadius)), Math.ceil(maxRadius));
    return found.rows * found.cols ? found.data32F.slice() : new Float32Array(0);
  });
}

function drawDisk(rows, cols, cx, cy, r, value = 1, type = null) {
  const c = cv();
  const m = c.Mat.zeros(rows, cols, type ?? c.CV_8U);
  c.circle(m, new c.Point(cx, cy), r, new c.Scalar(value), -1);
  return m;
}

/** segment.seeding_circles: the seeding circles [[x, y, r]] and the mask with pale centres filled. */
function seedingCircles(density, mask, w, h, diameter) {
  mask = mask.slice();
  const spacing2 = f32((S.CIRCLE_SPACING * diameter) ** 2);
  const used = [];
  const found = circles(density, w, h, S.CIRCLE_RADII[0] * diameter, S.CIRCLE_RADII[1] * diameter,
    S.HOUGH_MIN_DISTANCE * diameter);
  for (let i = 0; i < found.length; i += 3) {
    const x = found[i]; const y = found[i + 1]; const r = found[i + 2];
    const ix = pyRound(x); const iy = pyRound(y);
    if (!(ix >= 0 && ix < w && iy >= 0 && iy < h)) continue;
    if (used.some(([ux, uy]) => f32(f32(f32(x - ux) ** 2) + f32(f32(y - uy) ** 2)) < spacing2)) continue;
    if (!mask[iy * w + ix]) {
      const x0 = Math.max(0, Math.trunc(f32(x - r))); const y0 = Math.max(0, Math.trunc(f32(y - r)));
      const x1 = Math.min(w, Math.trunc(f32(x + r)) + 1); const y1 = Math.min(h, Math.trunc(f32(y + r)) + 1);
      const cx = pyRound(x - x0); const cy = pyRound(y - y0);
      const disc = take(drawDisk(y1 - y0, x1 - x0, cx, cy, pyRound(r)));
      let stained = 0; let area = 0;
      for (let yy = y0; yy < y1; yy++) {
        for (let xx = x0; xx < x1; xx++) {
          if (disc[(yy - y0) * (x1 - x0) + (xx - x0)]) { area++; if (mask[yy * w + xx]) stained++; }
        }
      }
      if (stained < S.PALE_CENTRE_COVER * area) continue;
      const pallor = take(drawDisk(y1 - y0, x1 - x0, cx, cy, Math.max(1, pyRound(f32(S.PALE_CENTRE_FILL * r)))));
      for (let yy = y0; yy < y1; yy++) {
        for (let xx = x0; xx < x1; xx++) if (pallor[(yy - y0) * (x1 - x0) + (xx - x0)]) mask[yy * w + xx] = 1;
      }
    }
    used.push([x, y, r]);
  }
  return { circles: used, mask };
}

/** segment.cell_seeds: Int32 seed labels. */
function cellSeeds(distance, cellCircles, mask, w, h, diameter) {
  const c = cv();
  const seeds = withMats((k) => {
    const m = k(c.Mat.zeros(h, w, c.CV_32S));
    cellCircles.forEach(([x, y], i) => {
      c.circle(m, new c.Point(pyRound(x), pyRound(y)), Math.max(1, pyRound(diameter * 0.1)), new c.Scalar(i + 1), -1);
    });
    return m.data32S.slice();
  });
  const count = cellCircles.length;
  const { labels: peaks, count: peakCount } = markers(distance, w, h, diameter);
  const near = dilateDisk(Uint8Array.from(seeds, (v) => (v > 0 ? 1 : 0)), w, h, diameter * 0.4);
  const covered = new Uint8Array(peakCount + 1);
  for (let i = 0; i < peaks.length; i++) if (near[i] && peaks[i] > 0) covered[peaks[i]] = 1;
  const loneIds = new Int32Array(peakCount + 1).fill(-1);
  let next = 0;
  for (let p = 1; p <= peakCount; p++) if (!covered[p]) loneIds[p] = next++;
  // np.unique(..., return_inverse) ranks only the lone labels present: every label 1..count is present.
  for (let i = 0; i < peaks.length; i++) {
    const p = peaks[i];
    if (p > 0 && !covered[p]) seeds[i] = count + 1 + loneIds[p];
    if (!mask[i]) seeds[i] = 0;
  }
  return seeds;
}

/** segment.split_touching: Int32 labels, every pixel of a blob to its nearest seed. */
function splitTouching(mask, seeds, w, h) {
  const c = cv();
  const { count, labels: blobs, stats } = components(mask, w, h, 8);
  const labels = new Int32Array(w * h);
  const seedsPerBlob = new Int32Array(count);
  for (let i = 0; i < seeds.length; i++) if (seeds[i] > 0) seedsPerBlob[blobs[i]]++;
  let next = 1;
  for (let b = 1; b < count; b++) {
    const [x, y, bw, bh] = stats.subarray(5 * b, 5 * b + 4);
    if (seedsPerBlob[b] <= 1) {
      for (let yy = y; yy < y + bh; yy++) for (let xx = x; xx < x + bw; xx++) if (blobs[yy * w + xx] === b) labels[yy * w + xx] = next;
      next++;
      continue;
    }
    const local = new Int32Array(bw * bh);
    const zeros = new Uint8Array(bw * bh);
    for (let yy = 0; yy < bh; yy++) {
      for (let xx = 0; xx < bw; xx++) {
        const i = (y + yy) * w + x + xx;
        local[yy * bw + xx] = blobs[i] === b ? seeds[i] : 0;
        zeros[yy * bw + xx] = local[yy * bw + xx] === 0 ? 1 : 0;
      }
    }
    const nearest = withMats((k) => {
      const src = k(toMat(zeros, bh, bw, c.CV_8U));
      const dist = k(new c.Mat()); const lab = k(new c.Mat());
      c.distanceTransformWithLabels(src, dist, lab, c.DIST_L2, 5, c.DIST_LABEL_PIXEL);
      return lab.data32S.slice();
    });
    let maxLabel = 0;
    for (const v of nearest) if (v > maxLabel) maxLabel = v;
    const seedOf = new Int32Array(maxLabel + 1);
    for (let i = 0; i < local.length; i++) if (local[i]) seedOf[nearest[i]] = local[i];
    const owners = new Set();
    for (let yy = 0; yy < bh; yy++) for (let xx = 0; xx < bw; xx++) {
      if (blobs[(y + yy) * w + x + xx] === b) owners.add(seedOf[nearest[yy * bw + xx]]);
    }
    const sorted = [...owners].sort((a, b2) => a - b2);
    const remap = new Map(sorted.map((o, i) => [o, next + i]));
    for (let yy = 0; yy < bh; yy++) for (let xx = 0; xx < bw; xx++) {
      const i = (y + yy) * w + x + xx;
      if (blobs[i] === b) labels[i] = remap.get(seedOf[nearest[yy * bw + xx]]);
    }
    next += sorted.length;
  }
  return labels;
}

/** segment.regions_of: [{label, x, y, w, h, area}] by label. */
export function regionsOf(labels, w) {
  const boxes = new Map();
  for (let i = 0; i < labels.length; i++) {
    const l = labels[i];
    if (!l) continue;
    const x = i % w; const y = (i - x) / w;
    const b = boxes.get(l);
    if (!b) boxes.set(l, { label: l, x0: x, x1: x, y0: y, y1: y, area: 1 });
    else {
      if (x < b.x0) b.x0 = x; if (x > b.x1) b.x1 = x; if (y > b.y1) b.y1 = y; b.area++;
    }
  }
  return [...boxes.values()].sort((a, b) => a.label - b.label)
    .map((b) => ({ label: b.label, x: b.x0, y: b.y0, w: b.x1 - b.x0 + 1, h: b.y1 - b.y0 + 1, area: b.area }));
}

function maxOf(a) { let m = 0; for (const v of a) if (v > m) m = v; return m; }

/** segment.split_clumps: k-means on the pixel positions of blobs of several cells' area. */
function splitClumps(labels, w, diameter) {
  const c = cv();
  const cellArea = Math.PI * diameter * diameter / 4.0;
  const out = labels.slice();
  let next = maxOf(labels) + 1;
  for (const blob of regionsOf(labels, w)) {
    const k = pyRound(blob.area / cellArea);
    if (blob.area < S.CLUMP_AREA * cellArea || k < 2 || k > S.CLUMP_MAX_CELLS) continue;
    if (blob.area <= S.ENLARGED_AREA * cellArea
      && isOneCell(windowOf(labels, w, blob.x, blob.y, blob.w, blob.h, blob.label), blob.w, blob.h)) continue;
    const xs = []; const ys = [];
    for (let yy = blob.y; yy < blob.y + blob.h; yy++) for (let xx = blob.x; xx < blob.x + blob.w; xx++) {
      if (labels[yy * w + xx] === blob.label) { xs.push(xx); ys.push(yy); }
    }
    const points = new Float32Array(2 * xs.length);
    xs.forEach((x, i) => { points[2 * i] = x; points[2 * i + 1] = ys[i]; });
    const parts = withMats((keep) => {
      const data = keep(toMat(points, xs.length, 2, c.CV_32F));
      const best = keep(new c.Mat()); const centers = keep(new c.Mat());
      c.setRNGSeed(0);
      const criteria = new c.TermCriteria(c.TERM_CRITERIA_EPS + c.TERM_CRITERIA_MAX_ITER, 20, 0.5);
      c.kmeans(data, k, best, criteria, 3, c.KMEANS_PP_CENTERS, centers);
      return best.data32S.slice();
    });
    for (let part = 1; part < k; part++) {
      for (let i = 0; i < xs.length; i++) if (parts[i] === part) out[ys[i] * w + xs[i]] = next;
      next++;
    }
  }
  return out;
}

function nucleusMask(density, labels) {
  const cells = [];
  for (let i = 0; i < labels.length; i++) if (labels[i] > 0) cells.push(density[i]);
  const typical = cells.length ? median32(cells) : 0.0;
  const level = f32(Math.max(S.NUCLEUS_DENSITY_RATIO * typical, 4 * S.MIN_DENSITY));
  const out = new Uint8Array(density.length);
  for (let i = 0; i < out.length; i++) out[i] = density[i] > level ? 1 : 0;
  return out;
}

/** segment.near_border */
function nearBorder(blob, w, h, diameter) {
  const margin = pyRound(S.BORDER_MARGIN * diameter);
  return blob.x <= margin || blob.y <= margin || blob.x + blob.w >= w - margin || blob.y + blob.h >= h - margin;
}

/** segment.keep_cell */
function keepCell(blob, labels, nucleus, pigment, w, diameter) {
  const cellArea = Math.PI * diameter * diameter / 4.0;
  if (!(S.MIN_CELL_AREA * cellArea <= blob.area && blob.area <= S.ENLARGED_AREA * cellArea)) return false;
  if (Math.max(blob.w, blob.h) > 2.2 * diameter || Math.min(blob.w, blob.h) < 0.4 * diameter) return false;
  if (blob.area > 2.2 * cellArea
    && !isOneCell(windowOf(labels, w, blob.x, blob.y, blob.w, blob.h, blob.label), blob.w, blob.h)) return false;
  if (blob.area / (blob.w * blob.h) < 0.45) return false;
  let dark = 0; let brown = 0;
  for (let yy = blob.y; yy < blob.y + blob.h; yy++) for (let xx = blob.x; xx < blob.x + blob.w; xx++) {
    const i = yy * w + xx;
    if (labels[i] !== blob.label) continue;
    if (nucleus[i]) dark++;
    if (pigment[i]) brown++;
  }
  // A dense blob is a white cell unless it holds malaria pigment (a mature parasite filling its cell).
  if (dark > S.NUCLEUS_FRACTION * blob.area) return brown >= S.PIGMENT_FRACTION * blob.area;
  return true;
}

/** segment.circle_of_region: Map label -> [x, y, r], the first circle whose centre lies on it. */
function circleOfRegion(labels, w, h, cellCircles) {
  const out = new Map();
  for (const [x, y, r] of cellCircles) {
    const ix = pyRound(x); const iy = pyRound(y);
    if (ix >= 0 && ix < w && iy >= 0 && iy < h && labels[iy * w + ix] > 0) {
      const l = labels[iy * w + ix];
      if (!out.has(l)) out.set(l, [x, y, r]);
    }
  }
  return out;
}

/** segment.add_pale_cells (labels changed in place). */
function addPaleCells(labels, channels, density, tmap, img, diameter) {
  const c = cv();
  const { width: w, height: h, data } = img;
  let pale = new Uint8Array(labels.length);
  for (let i = 0; i < pale.length; i++) {
    const top = Math.max(data[3 * i], data[3 * i + 1], data[3 * i + 2]);
    const low = Math.max(f32(f32(S.PALE_LEVEL) * tmap[i]), f32(S.PALE_FLOOR));
    const pink = f32(f32(S.PALE_PINK) * channels[0][i]) <= channels[1][i];
    pale[i] = density[i] > low && density[i] <= tmap[i] && pink && top > S.BLACK_LEVEL ? 1 : 0;
  }
  pale = withMats((k) => {
    const m = k(toMat(pale, h, w, c.CV_8U));
    const out = k(new c.Mat());
    c.morphologyEx(m, out, c.MORPH_CLOSE, k(disk(diameter / 10.0)));
    return out.data.slice();
  });
  const cellArea = Math.PI * diameter ** 2 / 4.0;
  pale = fillHoles(pale, w, h, S.HOLE_AREA * cellArea);
  for (let i = 0; i < pale.length; i++) if (labels[i] !== 0) pale[i] = 0;
  pale = clean(pale, w, h, S.PALE_OPEN * diameter);
  const { count, labels: parts, stats } = components(pale, w, h, 4);
  const growRadius = Math.max(1, pyRound(S.PALE_GROW * diameter));
  const pad = growRadius + 1;
  let next = maxOf(labels) + 1;
  for (let part = 1; part < count; part++) {
    const [x, y, bw, bh, area] = stats.subarray(5 * part, 5 * part + 5);
    if (area < S.PALE_AREA[0] * cellArea || area > S.PALE_AREA[1] * cellArea) continue;
    const x0 = Math.max(0, x - pad); const y0 = Math.max(0, y - pad);
    const x1 = Math.min(w, x + bw + pad); const y1 = Math.min(h, y + bh + pad);
    const grown = withMats((k) => {
      const own = windowOf(parts, w, x, y, bw, bh, part);
      const hull = largestHull(k, k(toMat(own, bh, bw, c.CV_8U)), c.CHAIN_APPROX_SIMPLE);
      const hullArea = c.contourArea(hull);
      if (hullArea <= 0 || area / hullArea < S.PALE_SOLIDITY) return null;
      const shifted = k(new c.Mat(hull.rows, 1, c.CV_32SC2));
      const src = hull.data32S; const dst = shifted.data32S;
      for (let i = 0; i < hull.rows; i++) { dst[2 * i] = src[2 * i] + x - x0; dst[2 * i + 1] = src[2 * i + 1] + y - y0; }
      const polys = k(new c.MatVector());
      polys.push_back(shifted);
      const win = k(c.Mat.zeros(y1 - y0, x1 - x0, c.CV_8U));
      c.fillPoly(win, polys, new c.Scalar(1));
      const out = k(new c.Mat());
      c.dilate(win, out, k(disk(S.PALE_GROW * diameter)));
      return out.data.slice();
    });
    if (grown === null) continue;
    const ww = x1 - x0;
    for (let yy = 0; yy < y1 - y0; yy++) for (let xx = 0; xx < ww; xx++) if (grown[yy * ww + xx]) labels[(yy + y0) * w + xx + x0] = next;
    next++;
  }
  return labels;
}

/** segment.detach_beyond_circles (labels changed in place), then claimSeedlessCells. */
function detachBeyondCircles(labels, w, h, cellCircles, diameter, dropBorder) {
  let next = maxOf(labels) + 1;
  const small = S.MIN_CELL_AREA * Math.PI * diameter * diameter / 4.0;
  const trimmed = new Uint8Array(labels.length);
  for (const [label, [x, y, r]] of circleOfRegion(labels, w, h, cellCircles)) {
    const x0 = Math.max(0, Math.trunc(x - 3 * r)); const y0 = Math.max(0, Math.trunc(y - 3 * r));
    const x1 = Math.min(w, Math.trunc(x + 3 * r) + 1); const y1 = Math.min(h, Math.trunc(y + 3 * r) + 1);
    const ww = x1 - x0; const wh = y1 - y0;
    const parts = (radius) => {
      const beyond = new Uint8Array(ww * wh);
      let any = false;
      for (let yy = 0; yy < wh; yy++) for (let xx = 0; xx < ww; xx++) {
        const dx = xx + x0 - x; const dy = yy + y0 - y;
        if (labels[(yy + y0) * w + xx + x0] === label && dx * dx + dy * dy > radius * radius) {
          beyond[yy * ww + xx] = 1; any = true;
        }
      }
      if (!any) return [];
      const { count, labels: cc, stats } = components(beyond, ww, wh, 8);
      const out = [];
      for (let p = 1; p < count; p++) out.push({ p, cc, stats: stats.subarray(5 * p, 5 * p + 5) });
      return out;
    };
    const set = ({ p, cc }, value) => {
      for (let yy = 0; yy < wh; yy++) for (let xx = 0; xx < ww; xx++) if (cc[yy * ww + xx] === p) labels[(yy + y0) * w + xx + x0] = value;
    };
    if (dropBorder) {
      for (const part of parts(S.BORDER_TRIM * r)) {
        const [px, py, pw, ph] = part.stats;
        if (y0 + py === 0 || x0 + px === 0 || y0 + py + ph === h || x0 + px + pw === w) set(part, next++);
      }
    }
    for (const part of parts(S.REACH_TRIM * r)) {
      if (part.stats[4] >= small) continue;
      set(part, 0);
      for (let yy = 0; yy < wh; yy++) for (let xx = 0; xx < ww; xx++) if (part.cc[yy * ww + xx] === part.p) trimmed[(yy + y0) * w + xx + x0] = 1;
    }
  }
  return claimSeedlessCells(labels, trimmed, w, h, diameter);
}

/** segment.claim_seedless_cells: slivers trimmed from several cells that together cover SEEDLESS_AREA of a cell
 * are a cell no seed reached: their convex hull, filled, becomes a region (labels changed in place). */
function claimSeedlessCells(labels, trimmed, w, h, diameter) {
  const c = cv();
  const { count, labels: parts, stats } = components(trimmed, w, h, 8);
  const least = S.SEEDLESS_AREA * Math.PI * diameter * diameter / 4.0;
  let next = maxOf(labels) + 1;
  for (let part = 1; part < count; part++) {
    const [x, y, bw, bh, area] = stats.subarray(5 * part, 5 * part + 5);
    if (area < least) continue;
    const hull = withMats((k) => {
      const own = windowOf(parts, w, x, y, bw, bh, part);
      const polys = k(new c.MatVector());
      polys.push_back(largestHull(k, k(toMat(own, bh, bw, c.CV_8U)), c.CHAIN_APPROX_SIMPLE));
      const win = k(c.Mat.zeros(bh, bw, c.CV_8U));
      c.fillPoly(win, polys, new c.Scalar(1));
      return win.data.slice();
    });
    for (let yy = 0; yy < bh; yy++) for (let xx = 0; xx < bw; xx++) if (hull[yy * bw + xx]) labels[(yy + y) * w + xx + x] = next;
    next++;
  }
  return labels;
}

/** segment.overlap_completed: [x0, y0, ww, wh, Uint8Array window mask]. */
function overlapCompleted(blob, labels, w, h, circle) {
  if (!circle) {
    const own = new Uint8Array(blob.w * blob.h);
    for (let yy = 0; yy < blob.h; yy++) for (let xx = 0; xx < blob.w; xx++) {
      own[yy * blob.w + xx] = labels[(blob.y + yy) * w + blob.x + xx] === blob.label ? 1 : 0;
    }
    return [blob.x, blob.y, blob.w, blob.h, own];
  }
  const [x, y, r] = circle;
  const x0 = Math.max(0, Math.min(blob.x, Math.floor(x - r))); const y0 = Math.max(0, Math.min(blob.y, Math.floor(y - r)));
  const x1 = Math.min(w, Math.max(blob.x + blob.w, Math.ceil(x + r) + 1));
  const y1 = Math.min(h, Math.max(blob.y + blob.h, Math.ceil(y + r) + 1));
  const ww = x1 - x0; const wh = y1 - y0;
  const inside = take(drawDisk(wh, ww, pyRound(x - x0), pyRound(y - y0), pyRound(r)));
  const full = new Uint8Array(ww * wh);
  for (let yy = 0; yy < wh; yy++) for (let xx = 0; xx < ww; xx++) {
    const l = labels[(yy + y0) * w + xx + x0];
    full[yy * ww + xx] = l === blob.label || (l > 0 && inside[yy * ww + xx]) ? 1 : 0;
  }
  return [x0, y0, ww, wh, full];
}

/** segment._to_full_scale: a cell {box, mask, area, centre, touchesBorder} in the field's pixels. */
function toFullScale(x0, y0, bw0, bh0, window, scale, fullW, fullH) {
  const c = cv();
  const fx0 = Math.floor(x0 / scale); const fy0 = Math.floor(y0 / scale);
  const fx1 = Math.min(fullW, Math.ceil((x0 + bw0) / scale)); const fy1 = Math.min(fullH, Math.ceil((y0 + bh0) / scale));
  const w = Math.max(1, fx1 - fx0); const h = Math.max(1, fy1 - fy0);
  let mask; let mw = bw0; let mh = bh0;
  if (scale < 1.0) {
    const f = Float32Array.from(window);
    const resized = withMats((k) => {
      const m = k(toMat(f, bh0, bw0, c.CV_32F));
      const out = k(new c.Mat());
      c.resize(m, out, new c.Size(w, h), 0, 0, c.INTER_LINEAR);
      return out.data32F.slice();
    });
    mask = resized.map((v) => (v >= 0.5 ? 1 : 0));
    mask = Uint8Array.from(mask); mw = w; mh = h;
  } else {
    mask = window;
  }
  if (!countOn(mask)) mask = new Uint8Array(mw * mh).fill(1);
  return tightRegion(fx0, fy0, mask, mw, mh, fullW, fullH);
}

/** segment._tight_region: the cell of a 0/1 ``window`` (ww x wh, not empty) at (x0, y0) of a fullW x fullH image,
 * its box tightened to the mask: {box, mask, area, centre, touchesBorder}. */
function tightRegion(x0, y0, window, ww, wh, fullW, fullH) {
  let minX = Infinity; let maxX = -1; let minY = Infinity; let maxY = -1;
  for (let yy = 0; yy < wh; yy++) for (let xx = 0; xx < ww; xx++) if (window[yy * ww + xx]) {
    if (xx < minX) minX = xx; if (xx > maxX) maxX = xx; if (yy < minY) minY = yy; if (yy > maxY) maxY = yy;
  }
  const tw = maxX - minX + 1; const th = maxY - minY + 1;
  const tight = new Uint8Array(tw * th);
  let area = 0; let sx = 0; let sy = 0;
  for (let yy = 0; yy < th; yy++) for (let xx = 0; xx < tw; xx++) {
    if (window[(yy + minY) * ww + xx + minX]) { tight[yy * tw + xx] = 1; area++; sx += xx; sy += yy; }
  }
  const bx = x0 + minX; const by = y0 + minY;
  const touches = bx <= 0 || by <= 0 || bx + tw >= fullW || by + th >= fullH;
  return { box: [bx, by, tw, th], mask: tight, area, centre: [bx + sx / area, by + sy / area], touchesBorder: touches };
}

/** Set to 1 the pixels of ``window`` (ww x wh at (x0, y0) of the image) that ``cell``'s mask covers, clipped. */
function pasteMask(window, ww, wh, x0, y0, cell) {
  const [x, y, w, h] = cell.box;
  for (let yy = Math.max(y, y0); yy < Math.min(y + h, y0 + wh); yy++) {
    for (let xx = Math.max(x, x0); xx < Math.min(x + w, x0 + ww); xx++) {
      if (cell.mask[(yy - y) * w + xx - x]) window[(yy - y0) * ww + xx - x0] = 1;
    }
  }
}

export function workScale(diameter) { return Math.min(1.0, S.WORK_DIAMETER / diameter); }

/** segment.label_cells (``channels``: the channel densities when the caller has them) */
function labelCells(img, diameter, dropBorder, channels = null) {
  const { width: w, height: h } = img;
  channels = channels ?? channelDensities(img);
  const density = stainDensity(img, channels);
  const tmap = thresholdMap(density, w, h);
  const stained = foregroundMask(density, img, tmap);
  let mask = clean(stained, w, h, diameter / 14.0);
  const cellArea = Math.PI * diameter ** 2 / 4.0;
  mask = fillHoles(mask, w, h, S.HOLE_AREA * cellArea, S.ROUND_HOLE_AREA * cellArea);
  mask = fillBrokenRims(mask, stained, w, h, diameter);
  const distance = distanceMap(mask, w, h);
  const seeded = seedingCircles(density, mask, w, h, diameter);
  const seeds = cellSeeds(distance, seeded.circles, seeded.mask, w, h, diameter);
  let labels = splitTouching(seeded.mask, seeds, w, h);
  labels = detachBeyondCircles(labels, w, h, seeded.circles, diameter, dropBorder);
  labels = addPaleCells(labels, channels, density, tmap, img, diameter);
  return { labels, density, circles: seeded.circles };
}

/** segment.segment_field: every whole red cell, in reading order. ``diameter``: the field's cell diameter in its
 * own pixels (quality.measureCellDiameter); none found -> []. */
export function segmentField(img, diameter, dropBorder = true) {
  return segmentFieldAndEdge(img, diameter, dropBorder).cells;
}

/** segment.segment_field_and_edge: {cells, edge}, the whole cells and the cells cut by the image edge with at least
 * EDGE_CELL_AREA in view, each in reading order. */
export function segmentFieldAndEdge(img, diameter, dropBorder = true) {
  if (diameter == null || diameter < 6) return { cells: [], edge: [] };
  const scale = workScale(diameter);
  const small = resizeRgb(img, scale);
  const d = diameter * scale;
  const { width: w, height: h } = small;
  const channels = channelDensities(small);
  let { labels, density, circles: cellCircles } = labelCells(small, d, dropBorder, channels);
  labels = splitClumps(labels, w, d);
  const nucleus = nucleusMask(density, labels);
  const pigment = pigmentMask(channels);
  const circleOf = circleOfRegion(labels, w, h, cellCircles);
  const cells = []; const edge = [];
  const inView = S.EDGE_CELL_AREA * Math.PI * d * d / 4.0;
  for (const blob of regionsOf(labels, w)) {
    const cut = dropBorder && nearBorder(blob, w, h, d);
    if ((cut && blob.area < inView) || !keepCell(blob, labels, nucleus, pigment, w, d)) continue;
    const [x0, y0, ww, wh, win] = overlapCompleted(blob, labels, w, h, circleOf.get(blob.label));
    (cut ? edge : cells).push(toFullScale(x0, y0, ww, wh, win, scale, img.width, img.height));
  }
  return { cells: inReadingOrder(cells, diameter), edge: inReadingOrder(edge, diameter) };
}

/** segment.reading_order as a comparator of two boxes: top to bottom in rows one ``diameter`` high, left to right
 * within a row. */
export function readingOrder(diameter) {
  const row = Math.max(1, Math.trunc(diameter));
  return (a, b) => Math.floor(a[1] / row) - Math.floor(b[1] / row) || a[0] - b[0];
}

/** segment.in_reading_order (a sorted copy). */
function inReadingOrder(cells, diameter) {
  const before = readingOrder(diameter);
  return cells.slice().sort((a, b) => before(a.box, b.box));
}

/** segment.joined_region: cells ``a`` and ``b`` (full scale) as one cell when their masks touch and the union is
 * one round cell (connected, up to ENLARGED_AREA cell areas, ONE_CELL_SOLIDITY of its hull); else null. */
export function joinedRegion(a, b, diameter) {
  const x0 = Math.min(a.box[0], b.box[0]); const y0 = Math.min(a.box[1], b.box[1]);
  const x1 = Math.max(a.box[0] + a.box[2], b.box[0] + b.box[2]);
  const y1 = Math.max(a.box[1] + a.box[3], b.box[1] + b.box[3]);
  const ww = x1 - x0; const wh = y1 - y0;
  const union = new Uint8Array(ww * wh);
  for (const cell of [a, b]) pasteMask(union, ww, wh, x0, y0, cell);
  const area = countOn(union);
  if (area > S.ENLARGED_AREA * Math.PI * diameter * diameter / 4.0) return null;
  if (components(union, ww, wh, 8).count !== 2 || solidity(union, ww, wh) < S.ONE_CELL_SOLIDITY) return null;
  let sx = 0; let sy = 0;
  for (let yy = 0; yy < wh; yy++) for (let xx = 0; xx < ww; xx++) if (union[yy * ww + xx]) { sx += xx; sy += yy; }
  return {
    box: [x0, y0, ww, wh], mask: union, area, centre: [x0 + sx / area, y0 + sy / area],
    touchesBorder: a.touchesBorder || b.touchesBorder,
  };
}

/** cv2.resize(mask, (tw, th), INTER_NEAREST) of a 0/1 Uint8Array w x h. */
function resizeNearest(mask, w, h, tw, th) {
  const c = cv();
  return withMats((k) => {
    const out = k(new c.Mat());
    c.resize(k(toMat(mask, h, w, c.CV_8U)), out, new c.Size(tw, th), 0, 0, c.INTER_NEAREST);
    return out.data.slice();
  });
}

/** cv2.erode(mask, disk(radius)) of a 0/1 Uint8Array w x h. */
function erodeDisk(mask, w, h, radius) {
  const c = cv();
  return withMats((k) => {
    const out = k(new c.Mat());
    c.erode(k(toMat(mask, h, w, c.CV_8U)), out, k(disk(radius)));
    return out.data.slice();
  });
}

/** segment._parts_touching: the connected parts of ``mask`` that hold a pixel of ``core`` (0/1 arrays, w x h). */
function partsTouching(mask, core, w, h, connectivity) {
  const { count, labels } = components(mask, w, h, connectivity);
  const keep = new Uint8Array(count);
  for (let i = 0; i < labels.length; i++) if (core[i] && mask[i]) keep[labels[i]] = 1;
  keep[0] = 0;
  return labels.map((l) => keep[l]);
}

/** segment.refit_outline: ``cell`` (full scale) grown into the pixels around it that have its own colour rather
 * than its ``neighbours``' or the glass's (REFIT_PAD), when it stays one round cell; else null. */
export function refitOutline(img, cell, neighbours, diameter) {
  const c = cv();
  const pad = pyRound(S.REFIT_PAD * diameter);
  const [x, y, w, h] = cell.box;
  const x0 = Math.max(0, x - pad); const y0 = Math.max(0, y - pad);
  const x1 = Math.min(img.width, x + w + pad); const y1 = Math.min(img.height, y + h + pad);
  const ww = x1 - x0; const wh = y1 - y0;
  const own = new Uint8Array(ww * wh);
  pasteMask(own, ww, wh, x0, y0, cell);
  const others = new Uint8Array(ww * wh);
  for (const other of neighbours) pasteMask(others, ww, wh, x0, y0, other);
  const scale = workScale(diameter);
  const d = diameter * scale;
  const crop = new Uint8Array(ww * wh * 3);
  for (let yy = 0; yy < wh; yy++) crop.set(img.data.subarray(3 * ((y0 + yy) * img.width + x0), 3 * ((y0 + yy) * img.width + x1)), 3 * yy * ww);
  const small = resizeRgb({ width: ww, height: wh, data: crop }, scale);
  const { width: sw, height: sh } = small;
  const ownSmall = resizeNearest(own, ww, wh, sw, sh);
  const othersSmall = resizeNearest(others, ww, wh, sw, sh).map((v, i) => v & (1 - ownSmall[i]));
  const core = erodeDisk(ownSmall, sw, sh, S.REFIT_CORE * d);
  const neighbourCore = erodeDisk(othersSmall, sw, sh, S.REFIT_NEIGHBOUR_CORE * d);
  const beyond = distanceMap(ownSmall.map((v) => 1 - v), sw, sh);
  const glass = ownSmall.map((v, i) => (!v && !othersSmall[i] && beyond[i] > S.REFIT_OPEN * d ? 1 : 0));
  const colour = withMats((k) => {
    const blurred = k(new c.Mat());
    c.GaussianBlur(k(toMat(Float32Array.from(small.data), sh, sw, c.CV_32FC3)), blurred, new c.Size(0, 0), S.REFIT_BLUR * d);
    return blurred.data32F.map((v) => -Math.log1p(v));
  });
  const n = sw * sh;
  const likelihoods = [core, neighbourCore, glass].map((pixels) => {
    const count = countOn(pixels);
    if (count < S.REFIT_MIN_PIXELS) return null;
    const mean = [0, 0, 0]; const variance = [0, 0, 0];
    for (let i = 0; i < n; i++) if (pixels[i]) for (let ch = 0; ch < 3; ch++) mean[ch] += colour[3 * i + ch];
    for (let ch = 0; ch < 3; ch++) mean[ch] /= count;
    for (let i = 0; i < n; i++) if (pixels[i]) for (let ch = 0; ch < 3; ch++) variance[ch] += (colour[3 * i + ch] - mean[ch]) ** 2;
    for (let ch = 0; ch < 3; ch++) variance[ch] = variance[ch] / count + S.REFIT_MIN_VARIANCE;
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      let sum = 0;
      for (let ch = 0; ch < 3; ch++) sum += (colour[3 * i + ch] - mean[ch]) ** 2 / variance[ch] + Math.log(variance[ch]);
      out[i] = -0.5 * sum;
    }
    return out;
  });
  if (!likelihoods[0]) return null;
  const reach = S.REFIT_REACH * d;
  let grown = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const mine = likelihoods[0][i];
    const nearestOwn = (!likelihoods[1] || mine >= likelihoods[1][i]) && (!likelihoods[2] || mine >= likelihoods[2][i]);
    grown[i] = (nearestOwn && beyond[i] <= reach && !neighbourCore[i]) || core[i] ? 1 : 0;
  }
  grown = partsTouching(grown, core, sw, sh, 4);
  grown = fillHoles(grown, sw, sh, S.HOLE_AREA * Math.PI * d * d / 4.0).map((v, i) => v & (1 - neighbourCore[i]));
  grown = partsTouching(clean(grown, sw, sh, S.REFIT_OPEN * d), core, sw, sh, 8);
  if (!countOn(grown)) return null;
  const added = toFullScale(0, 0, sw, sh, grown, scale, ww, wh);
  const union = own.slice();
  pasteMask(union, ww, wh, 0, 0, added);
  const area = countOn(union);
  if (area <= cell.area || area > S.ENLARGED_AREA * Math.PI * diameter * diameter / 4.0) return null;
  if (components(union, ww, wh, 8).count !== 2 || solidity(union, ww, wh) < S.ONE_CELL_SOLIDITY) return null;
  return tightRegion(x0, y0, union, ww, wh, img.width, img.height);
}

/** segment.cut_cell: the cell on black in its tight box, {width, height, data RGB}. */
export function cutCell(img, cell) {
  const [x, y, w, h] = cell.box;
  const data = new Uint8Array(w * h * 3);
  for (let yy = 0; yy < h; yy++) for (let xx = 0; xx < w; xx++) {
    if (!cell.mask[yy * w + xx]) continue;
    const s = 3 * ((y + yy) * img.width + x + xx); const t = 3 * (yy * w + xx);
    data[t] = img.data[s]; data[t + 1] = img.data[s + 1]; data[t + 2] = img.data[s + 2];
  }
  return { width: w, height: h, data };
}
