// From every cell of a slide to one call: a port of edge_runtime/slide.py (assess_slide) reading the rule from
// the model card's slide_rule. The call, the point estimate, the p-value and the detection limit are the same
// numbers as Python's; the 95% interval comes from the same Monte Carlo recipe with this side's own seeded
// generator, so it agrees within the draws' noise (a few hundredths of its width), not digit for digit.
import { loadConstants } from './constants.mjs';

const { slide: K } = loadConstants();

const LANCZOS = [0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313,
  -176.61502916214059, 12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7];

/** log Gamma(x), x > 0 (Lanczos, g = 7). */
export function lgamma(x) {
  if (x < 0.5) return Math.log(Math.PI / Math.abs(Math.sin(Math.PI * x))) - lgamma(1 - x);
  x -= 1;
  let a = LANCZOS[0];
  const t = x + 7.5;
  for (let i = 1; i < 9; i++) a += LANCZOS[i] / (x + i);
  return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
}

export function rates(rule, source) {
  const d = rule.sources[source];
  if (!d) throw new Error(`slide_rule has no rates for source ${source}`);
  const sn = d.sensitivity_n; const fn = d.false_flag_n;
  const k = (key, rateKey, n) => (key in d ? d[key] : Math.round(d[rateKey] * n));
  const r = {
    sensitivity_k: k('sensitivity_k', 'sensitivity', sn), sensitivity_n: sn,
    false_flag_k: k('false_flag_k', 'false_flag_rate', fn), false_flag_n: fn,
    candidate_sensitivity_k: k('candidate_sensitivity_k', 'candidate_sensitivity', sn),
    candidate_false_flag_k: k('candidate_false_flag_k', 'candidate_false_flag_rate', fn),
    measured_on: String(d.measured_on ?? ''), false_flag_sd: d.false_flag_sd ?? 0.0,
  };
  r.sensitivity = r.sensitivity_k / sn; r.false_flag_rate = r.false_flag_k / fn;
  r.candidate_sensitivity = r.candidate_sensitivity_k / sn; r.candidate_false_flag_rate = r.candidate_false_flag_k / fn;
  return r;
}

export function falseFlagBeta(r) {
  const m = (r.false_flag_k + 0.5) / (r.false_flag_n + 1.0);
  const v = r.false_flag_sd ** 2 + m * (1 - m) / (r.false_flag_n + 2.0);
  const phi = Math.max(m * (1 - m) / v - 1.0, 1e-3);
  return [m * phi, (1 - m) * phi];
}

export function falseFlagPValue(flagged, cells, a, b) {
  if (flagged <= 0) return 1.0;
  if (flagged > cells) return 0.0;
  const lbetaAb = lgamma(a) + lgamma(b) - lgamma(a + b);
  const lnChoose0 = lgamma(cells + 1);
  let below = 0.0;
  for (let x = 0; x < flagged; x++) {
    below += Math.exp(lnChoose0 - lgamma(x + 1) - lgamma(cells - x + 1) + lgamma(x + a) + lgamma(cells - x + b)
      - lgamma(cells + a + b) - lbetaAb);
  }
  return Math.min(1.0, Math.max(0.0, 1.0 - below));
}

export function detectionLimit(cells, candidateSensitivity, power = 0.95) {
  if (cells <= 0 || candidateSensitivity <= 0) return null;
  return Math.min(1.0, (1.0 - (1.0 - power) ** (1.0 / cells)) / candidateSensitivity);
}

// A small seeded generator (xorshift128+ on two 32-bit halves -> doubles in [0, 1)), normals by Box-Muller,
// gammas by Marsaglia-Tsang, betas as a ratio of gammas.
function generator(seed) {
  let s0 = (seed ^ 0x9e3779b9) >>> 0; let s1 = (seed * 2654435761) >>> 0; let s2 = 0x243f6a88; let s3 = 0x85a308d3;
  const next = () => {
    const t = s0 ^ (s0 << 11);
    s0 = s1; s1 = s2; s2 = s3;
    s3 = (s3 ^ (s3 >>> 19) ^ t ^ (t >>> 8)) >>> 0;
    return s3 / 4294967296;
  };
  for (let i = 0; i < 32; i++) next();
  let spare = null;
  const normal = () => {
    if (spare !== null) { const v = spare; spare = null; return v; }
    let u = 0; while (u === 0) u = next();
    const v = next();
    const r = Math.sqrt(-2 * Math.log(u));
    spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  };
  const gamma = (a) => {
    if (a < 1) { let u = 0; while (u === 0) u = next(); return gamma(a + 1) * u ** (1 / a); }
    const d = a - 1 / 3; const c = 1 / Math.sqrt(9 * d);
    for (;;) {
      let x; let v;
      do { x = normal(); v = 1 + c * x; } while (v <= 0);
      v = v * v * v;
      const u = next();
      if (u < 1 - 0.0331 * x ** 4 || Math.log(u) < 0.5 * x * x + d * (1 - v + Math.log(v))) return d * v;
    }
  };
  const beta = (a, b) => { const x = gamma(a); const y = gamma(b); return x / (x + y); };
  return { beta };
}

function percentiles(values, qs) {
  const a = Float64Array.from(values).sort();
  return qs.map((q) => {
    const pos = (a.length - 1) * q / 100; const lo = Math.floor(pos); const hi = Math.min(a.length - 1, lo + 1);
    return a[lo] + (a[hi] - a[lo]) * (pos - lo);
  });
}

export function correctedParasitemia(count, cells, sens, falseFlag, draws = K.DEFAULT_DRAWS, seed = K.SEED) {
  const se = sens[0] / sens[1];
  const ff = falseFlag ? falseFlag.false_flag_rate : 0.0;
  const point = Math.min(1, Math.max(0, (count / cells - ff) / (se - ff)));
  const rng = generator(seed);
  const [fa, fb] = falseFlag ? falseFlagBeta(falseFlag) : [0, 0];
  const p = new Float64Array(draws);
  for (let i = 0; i < draws; i++) {
    const q = rng.beta(count + 0.5, cells - count + 0.5);
    const s = rng.beta(sens[0] + 0.5, sens[1] - sens[0] + 0.5);
    const f = falseFlag ? rng.beta(fa, fb) : 0;
    p[i] = Math.min(1, Math.max(0, (q - f) / Math.max(s - f, 1e-9)));
  }
  let [low, high] = percentiles(p, [2.5, 97.5]);
  if (count === 0) low = 0.0;
  return [point, [Math.min(low, point), Math.max(high, point)]];
}

export function cellKey(row) {
  const cell = row.cell;
  return `${String(row.path ?? row.source ?? '')}#${cell === null || cell === undefined || cell === '' ? '' : Number(cell)}`;
}

/** slide.is_edge: a cell cut by the image edge (``at_edge``), shown for review, never counted. */
export function isEdge(row) {
  return ['1', 'true'].includes(String(row.at_edge ?? '').trim().toLowerCase());
}

/** slide.is_left_out: a candidate of a field left out of the count (``left_out``), shown for review, never counted. */
export function isLeftOut(row) {
  return Boolean(row.left_out);
}

function mostProbableFirst(rows, rule) {
  const cands = rows.filter((r) => Number(r.prob_parasitized) >= rule.candidate_threshold).map((r) => ({ ...r }));
  cands.sort((a, b) => (Number(b.prob_parasitized) - Number(a.prob_parasitized))
    || (String(a.path ?? '') < String(b.path ?? '') ? -1 : String(a.path ?? '') > String(b.path ?? '') ? 1 : 0)
    || (Number(a.cell || 0) - Number(b.cell || 0)));
  return cands;
}

/** slide.candidate_rows: ranked candidates; those of the fields in ``leftOut`` after the others, per field at most
 * max_candidate_share of its whole cells (at least one), marked ``left_out``; rows with an error never. */
export function candidateRows(rows, rule, leftOut = []) {
  const apart = new Set(leftOut);
  const counted = [];
  const byField = new Map();
  for (const r of rows) {
    if (r.error) continue;
    const p = String(r.path ?? '');
    if (!apart.has(p)) { counted.push(r); continue; }
    if (!byField.has(p)) byField.set(p, []);
    byField.get(p).push(r);
  }
  const shown = [];
  for (const frows of byField.values()) {
    const budget = Math.max(1, Math.ceil((rule.max_candidate_share ?? K.DEFAULT_MAX_CANDIDATE_SHARE) * frows.filter((r) => !isEdge(r)).length - 1e-9));
    shown.push(...mostProbableFirst(frows, rule).slice(0, budget).map((r) => ({ ...r, left_out: 1 })));
  }
  const cands = [...mostProbableFirst(counted, rule), ...mostProbableFirst(shown, rule)];
  cands.forEach((r, i) => { r.rank = i + 1; });
  return cands;
}

/** Python's format(v, '.Ng'). */
export function pyG(v, digits) {
  if (v === 0) return '0';
  const exp = Math.floor(Math.log10(Math.abs(v)));
  if (exp < -4 || exp >= digits) {
    const [m, e] = v.toExponential(digits - 1).split('e');
    const mant = m.includes('.') ? m.replace(/\.?0+$/, '') : m;
    const n = Number(e);
    return `${mant}e${n < 0 ? '-' : '+'}${String(Math.abs(n)).padStart(2, '0')}`;
  }
  const s = v.toFixed(Math.max(0, digits - 1 - exp));
  return s.includes('.') ? s.replace(/\.?0+$/, '') : s;
}
export const pct = (v, d = 2) => `${(100 * v).toFixed(d)}%`;

function doubtfulFields(rows, unfamiliarLimits) {
  const [thresholdU, warn] = unfamiliarLimits ?? [null, K.DEFAULT_UNFAMILIAR_WARN];
  const byField = new Map();
  for (const r of rows) {
    if (r.error || isEdge(r)) continue;
    const p = String(r.path ?? '');
    if (!byField.has(p)) byField.set(p, []);
    byField.get(p).push(r);
  }
  const warnings = []; const excluded = [];
  for (const [path, frows] of byField) {
    const reasons = [...new Set(frows.flatMap((r) => (!r.warnings ? [] : typeof r.warnings === 'string' ? [r.warnings] : r.warnings.map(String))))].sort();
    const nUnf = frows.filter((r) => (typeof r.unfamiliar === 'boolean' ? r.unfamiliar
      : r.unfamiliar !== null && r.unfamiliar !== undefined && r.unfamiliar !== '' && thresholdU !== null && Number(r.unfamiliar) > thresholdU)).length;
    if (nUnf && nUnf / frows.length > warn) {
      reasons.push(`unfamiliar images: ${nUnf}/${frows.length} cells look unlike the training data (> ${pct(warn, 0)}); adapt the model with edge-adapt`);
    }
    if (reasons.length) { excluded.push(path); warnings.push(`${path || 'slide'}: ${reasons.join('; ')}`); }
  }
  return [warnings, excluded];
}

/** slide.left_out_note: what a left-out field's warning adds (not counted; which of its candidates are shown). */
function leftOutNote(path, cands) {
  const shown = cands.filter((r) => isLeftOut(r) && String(r.path ?? '') === path).map((r) => `#${r.rank}`).join(', ');
  return ' (left out of the count' + (shown ? `; its candidates ${shown} shown for review)` : ')');
}

/** slide.assess_slide: rows (edge-classify's columns) -> the slide's result (to_json keys + detail). ``reviewed``:
 * null before review, else a Set of cellKey of the confirmed cells. */
export function assessSlide(rows, rule, { name = '', source = null, reviewed = null, rbcPerUl = K.DEFAULT_RBC_PER_UL,
  unfamiliarLimits = null, draws = K.DEFAULT_DRAWS } = {}) {
  const readable = rows.filter((r) => !r.error);
  source = source || (readable.some((r) => r.cell !== null && r.cell !== undefined && r.cell !== '') ? 'iml' : 'nih');
  const rt = rates(rule, source);
  const counted = readable.filter((r) => !isEdge(r));
  const [warnings, excluded] = doubtfulFields(readable, unfamiliarLimits);
  const ex = new Set(excluded);
  const shown = readable.filter((r) => !ex.has(String(r.path ?? '')));
  const good = shown.filter((r) => !isEdge(r));
  const cands = candidateRows(readable, rule, excluded);
  const result = {
    name, cells: good.length, candidates: cands.length, parasitemia: null, parasitemia_ci: null, parasites_per_ul: null,
    detection_limit: detectionLimit(good.length, rt.candidate_sensitivity), call: K.INDETERMINATE, reviewed: reviewed !== null,
    reason: '', source, flagged: good.filter((r) => Number(r.prob_parasitized) >= rule.threshold).length,
    confirmed: null, p_value: null, rbc_per_ul: rbcPerUl, warnings, excluded_fields: excluded,
    cells_total: counted.length, failed: rows.length - readable.length, rates: rt, candidate_list: cands,
    edge_candidates: cands.filter((r) => isEdge(r) && !isLeftOut(r)).length, confirmed_edge: null,
    left_out_candidates: cands.filter(isLeftOut).length, confirmed_left_out: null,
  };
  result.warnings = warnings.map((w, i) => w + leftOutNote(excluded[i], cands));
  if (good.length) {
    const n = good.length;
    let est; let ci;
    if (reviewed === null) {
      [est, ci] = correctedParasitemia(result.flagged, n, [rt.sensitivity_k, rt.sensitivity_n], rt, draws);
    } else {
      result.confirmed = good.filter((r) => reviewed.has(cellKey(r))).length;
      [est, ci] = correctedParasitemia(result.confirmed, n, [rt.candidate_sensitivity_k, rt.sensitivity_n], null, draws);
    }
    result.parasitemia = est; result.parasitemia_ci = ci; result.parasites_per_ul = est * rbcPerUl;
    result.p_value = falseFlagPValue(result.flagged, n, ...falseFlagBeta(rt));
  }
  if (reviewed !== null) {
    result.confirmed_edge = shown.filter((r) => isEdge(r) && reviewed.has(cellKey(r))).length;
    result.confirmed_left_out = readable.filter((r) => ex.has(String(r.path ?? '')) && reviewed.has(cellKey(r))).length;
  }
  callSlide(result, rule, rt, new Set(readable.map((r) => String(r.path ?? ''))).size);
  result.method = !result.reviewed
    ? 'Rogan-Gladen on cells flagged at the call threshold, 95% interval from Beta draws of the observed rate, sensitivity and false-flag rate'
    : 'confirmed cells divided by the candidate band\'s sensitivity, 95% interval from Beta draws of the confirmed rate and that sensitivity';
  result.detection_limit_meaning = 'lowest parasitemia at which, with 95% probability, at least one parasite of these cells is among the candidates';
  return result;
}

function callSlide(result, rule, rt, fields) {
  const n = result.cells; const cands = result.candidates; const excluded = result.excluded_fields;
  const minCells = rule.min_cells ?? K.DEFAULT_MIN_CELLS; const alpha = rule.alpha ?? K.DEFAULT_ALPHA;
  const leftOut = result.left_out_candidates;
  if (n < minCells) {
    const left = excluded.length ? ` after leaving out ${excluded.length} of ${fields} fields` : '';
    const shown = leftOut ? `; ${leftOut} candidates of those fields shown for review` : '';
    result.reason = `too few usable cells (${n} < ${minCells})${left}${shown}`;
    if (!result.cells_total) result.reason = 'no readable cells' + (result.failed ? ` (${result.failed} failed)` : '');
    if (result.reviewed && result.confirmed_left_out) {
      result.reason += `; the microscopist confirmed ${result.confirmed_left_out} in fields left out: parasites seen, the slide not read`;
    }
    return;
  }
  const dl = pct(result.detection_limit);
  if (result.reviewed) {
    const edge = result.confirmed_edge || 0; const apart = result.confirmed_left_out || 0;
    if (result.confirmed + edge + apart >= (rule.min_confirmed ?? 1)) {
      result.call = K.FOUND; result.reason = `the microscopist confirmed ${result.confirmed + edge + apart} of ${cands} candidates`;
      const seen = [[edge, `${edge} cut by the image edge`], [apart, `${apart} in fields left out`]].filter(([k]) => k).map(([, t]) => t);
      if (seen.length) result.reason += ` (${seen.join(' and ')}: seen, not counted in the parasitemia)`;
    } else {
      result.call = K.NONE_FOUND; result.reason = `none of ${cands} candidates confirmed; ${n} cells examined, detection limit ${dl}`;
    }
    return;
  }
  const expected = rt.false_flag_rate * n;
  if (result.p_value < alpha) {
    result.call = K.FOUND;
    result.reason = `${result.flagged} cells flagged where false flags explain about ${expected.toFixed(1)} (p = ${pyG(result.p_value, 2)} < ${pyG(alpha, 6)})`;
  } else if (cands) {
    result.call = K.REVIEW_NEEDED;
    result.reason = `${result.flagged} cells flagged, within what false flags explain (about ${expected.toFixed(1)}, p = ${pyG(result.p_value, 2)}); look at the ${cands} candidates`;
    if (leftOut) result.reason += ` (${leftOut} of them in fields left out)`;
  } else {
    result.call = K.NONE_FOUND; result.reason = `no candidate among ${n} cells; detection limit ${dl}`;
  }
}

export function toJson(r) {
  return {
    cells: r.cells, candidates: r.candidates, parasitemia: r.parasitemia, parasitemia_ci: r.parasitemia_ci,
    parasites_per_ul: r.parasites_per_ul, detection_limit: r.detection_limit, call: r.call, reviewed: r.reviewed,
  };
}
