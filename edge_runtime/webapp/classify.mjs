// Cells as the model sees them and the model's call: Pillow's antialiased bilinear resize (ported bit for bit:
// the same fixed-point coefficients), the unfamiliar score (edge_runtime/unfamiliar.py) and the int8 model run
// by LiteRT.js, one cell at a time (the phone model has batch 1).
import { loadConstants } from './constants.mjs';

const C = loadConstants();
const PRECISION_BITS = 32 - 8 - 2;

function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(1.0, scale);
  const support = 1.0 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let ww = 0.0;
    const ss = 1.0 / filterscale;
    let xmin = Math.trunc(center - support + 0.5); if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5); if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    for (let x = 0; x < xmax; x++) {
      let t = Math.abs((x + xmin - center + 0.5) * ss);
      t = t < 1.0 ? 1.0 - t : 0.0;
      w[x] = t; ww += t;
    }
    for (let x = 0; x < ksize; x++) {
      const v = x < xmax && ww !== 0.0 ? w[x] / ww : (x < xmax ? w[x] : 0);
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS)) : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[2 * xx] = xmin; bounds[2 * xx + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(v) {
  if (v >= (1 << PRECISION_BITS) * 256) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / (1 << PRECISION_BITS));
}

function horizontal(src, w, h, outW) {
  const hz = coefficients(w, outW);
  const out = new Uint8Array(outW * h * 3);
  for (let yy = 0; yy < h; yy++) {
    for (let xx = 0; xx < outW; xx++) {
      const xmin = hz.bounds[2 * xx]; const xmax = hz.bounds[2 * xx + 1]; const k = xx * hz.ksize;
      for (let ch = 0; ch < 3; ch++) {
        let ss = 1 << (PRECISION_BITS - 1);
        for (let x = 0; x < xmax; x++) ss += src[3 * (yy * w + x + xmin) + ch] * hz.kk[k + x];
        out[3 * (yy * outW + xx) + ch] = clip8(ss);
      }
    }
  }
  return out;
}

function vertical(src, w, h, outH) {
  const vt = coefficients(h, outH);
  const out = new Uint8Array(w * outH * 3);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = vt.bounds[2 * yy]; const ymax = vt.bounds[2 * yy + 1]; const k = yy * vt.ksize;
    for (let xx = 0; xx < w; xx++) {
      for (let ch = 0; ch < 3; ch++) {
        let ss = 1 << (PRECISION_BITS - 1);
        for (let y = 0; y < ymax; y++) ss += src[3 * ((y + ymin) * w + xx) + ch] * vt.kk[k + y];
        out[3 * (yy * w + xx) + ch] = clip8(ss);
      }
    }
  }
  return out;
}

/** Pillow's Image.resize((w, h), BILINEAR) of an RGB image {width, height, data}: the same bytes. Two 8-bit
 * passes (each rounded to uint8); Pillow 13 runs the vertical pass first when it shrinks the height by more than twice what the horizontal pass
 * shrinks the width (found by comparing both orders with Pillow on every crop size from 8 to 200 px to a 48 px square)
 * (checked against Pillow on up- and downscaled crops in web/test). Cropping the rows the second pass reads, as
 * Pillow does, changes no value. */
export function pillowResize(img, outW, outH) {
  const { width: inW, height: inH, data } = img;
  if (inW === outW && inH === outH) return img;
  const needH = outW !== inW; const needV = outH !== inH;
  if (needH && needV && inH > outH && inH - outH > 2 * (inW - outW)) {
    const tmp = vertical(data, inW, inH, outH);
    return { width: outW, height: outH, data: horizontal(tmp, inW, outH, outW) };
  }
  let src = data;
  if (needH) src = horizontal(src, inW, inH, outW);
  if (needV) src = vertical(src, outW, inH, outH);
  return { width: outW, height: outH, data: src };
}

/** unfamiliar.colour_features of one model-input cell (Uint8Array size*size*3): 13 numbers. */
export function colourFeatures(pixels) {
  const n = pixels.length / 3;
  const minSum = C.unfamiliar.FOREGROUND_MIN_SUM;
  let count = 0;
  for (let i = 0; i < n; i++) if (pixels[3 * i] + pixels[3 * i + 1] + pixels[3 * i + 2] > minSum) count++;
  const all = count < 1;
  if (all) count = n;
  const planes = [[], [], [], [], [], []];
  for (let i = 0; i < n; i++) {
    const r = pixels[3 * i]; const g = pixels[3 * i + 1]; const b = pixels[3 * i + 2];
    if (!all && !(r + g + b > minSum)) continue;
    const top = Math.max(r, g, b);
    const sat = Math.fround(Math.fround((top - Math.min(r, g, b)) / Math.max(top, Math.fround(1e-6))) * 255);
    planes[0].push(r); planes[1].push(g); planes[2].push(b); planes[3].push(sat);
    planes[4].push(r - g); planes[5].push(g - b);
  }
  const mean = planes.map((p) => p.reduce((a, v) => a + v, 0) / count);
  const std = planes.map((p, j) => Math.sqrt(p.reduce((a, v) => a + (v - mean[j]) ** 2, 0) / count));
  const fill = count / n * 100.0;
  return [mean[0], mean[1], mean[2], std[0], std[1], std[2], fill, mean[3], std[3], mean[4], std[4], mean[5], std[5]];
}

/** unfamiliar.scores: squared Mahalanobis distance to the nearest training source. */
export function unfamiliarScore(features, statistics) {
  let best = Infinity;
  for (const comp of statistics.components) {
    const diff = features.map((v, i) => v - comp.mean[i]);
    let d = 0;
    for (let i = 0; i < diff.length; i++) {
      let row = 0;
      for (let j = 0; j < diff.length; j++) row += comp.inverse_covariance[i][j] * diff[j];
      d += diff[i] * row;
    }
    best = Math.min(best, d);
  }
  return best;
}

/** The model: LiteRT.js with the batch-1 int8 file; probabilities as edge_runtime.bundle dequantizes them. */
export class CellModel {
  static async load(litert, modelUrl, wasmDir) {
    await litert.loadLiteRt(wasmDir);
    const started = performance.now();
    const model = await litert.loadAndCompile(modelUrl, { accelerator: 'wasm' });
    return new CellModel(litert, model, performance.now() - started);
  }

  constructor(litert, model, loadMs) {
    this.litert = litert; this.model = model; this.loadMs = loadMs;
    this.size = C.model.size;
    this.output = C.model.output;
  }

  /** P(parasitized) of one model-input cell (Uint8Array size*size*3). */
  async probability(pixels) {
    const input = new this.litert.Tensor(new Uint8Array(pixels), [1, this.size, this.size, 3]);
    let outputs;
    try {
      outputs = await this.model.run(input);
    } finally {
      input.delete();
    }
    const raw = outputs[0].toTypedArray();
    for (const t of outputs) t.delete();
    const { scale, zero_point: zero } = this.output;
    // (uint8 - zero) * scale in float32, as bundle.run; the head softmax2 puts P(parasitized) first.
    return Math.fround(Math.fround(raw[0] - zero) * Math.fround(scale));
  }

  delete() { this.model.delete(); }
}

export function decide(prob) {
  return prob >= C.model.threshold ? C.labels.PARASITIZED : C.labels.UNINFECTED;
}
