// Small helpers shared by segment.mjs and quality.mjs: the OpenCV.js module, Python's rounding, numpy-like
// statistics with float32 semantics where numpy keeps float32 (NumPy 2 compares a float32 array with a Python
// float in float32: fround the scalar).
let cvModule = null;
export function useCv(module) { cvModule = module; }
export function cv() {
  if (!cvModule) throw new Error('OpenCV.js is not loaded (useCv)');
  return cvModule;
}
export const f32 = Math.fround;

/** Python's round(): half to even. */
export function pyRound(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
}

/** np.median of a list of doubles. */
export function median(values) {
  const a = Float64Array.from(values).sort();
  const n = a.length;
  if (!n) return NaN;
  return n % 2 ? a[(n - 1) >> 1] : (a[n / 2 - 1] + a[n / 2]) / 2;
}

/** np.median of float32 values (the mean of the two middle ones taken in float32). */
export function median32(values) {
  const a = Float32Array.from(values).sort();
  const n = a.length;
  if (!n) return NaN;
  return n % 2 ? a[(n - 1) >> 1] : f32(f32(a[n / 2 - 1] + a[n / 2]) / 2);
}

/** np.percentile (linear) of numbers. */
export function percentile(values, q, sorted = false) {
  const a = sorted ? values : Float64Array.from(values).sort();
  const n = a.length;
  if (!n) return NaN;
  const pos = (n - 1) * q / 100;
  const lo = Math.floor(pos);
  const hi = Math.min(n - 1, lo + 1);
  return a[lo] + (a[hi] - a[lo]) * (pos - lo);
}

/** A new Mat holding a copy of a typed array. */
export function toMat(array, rows, cols, type) {
  const c = cv();
  const m = new c.Mat(rows, cols, type);
  view(m).set(array);
  return m;
}

/** The Mat's pixels as a typed array view (valid until the next OpenCV allocation: copy with .slice()). */
export function view(m) {
  const c = cv();
  switch (m.depth()) {
    case c.CV_8U: return m.data;
    case c.CV_32F: return m.data32F;
    case c.CV_32S: return m.data32S;
    case c.CV_16U: return m.data16U;
    case c.CV_64F: return m.data64F;
    default: throw new Error(`unsupported Mat depth ${m.depth()}`);
  }
}

/** Copy a Mat's pixels out and delete the Mat. */
export function take(m) {
  const out = view(m).slice();
  m.delete();
  return out;
}

/** Run fn with Mats that are deleted afterwards, whatever happens. */
export function withMats(fn) {
  const made = [];
  const keep = (m) => { made.push(m); return m; };
  try {
    return fn(keep);
  } finally {
    for (const m of made) if (!m.isDeleted()) m.delete();
  }
}
