// One field from pixels to calls, as edge_runtime/fields.classify_field_pixels: the cell diameter, the cells,
// the quality gate, then each cell cut on black, resized as Pillow does and classified, with its unfamiliar score.
import { colourFeatures, decide, pillowResize, unfamiliarScore } from './classify.mjs';
import { assessField, measureCellDiameter } from './quality.mjs';
import { loadConstants } from './constants.mjs';
import { pyRound } from './cvutil.mjs';
import { cutCell, joinedRegion, readingOrder, refitOutline, segmentFieldAndEdge } from './segment.mjs';

const C = loadConstants();

/** Classify a decoded field {width, height, data RGB}: {width, height, diameter, cells, quality, warnings,
 * ms: {segment, classify}}; cells carry index (reading order, from 1), box, prob_parasitized, prediction,
 * unfamiliar and the model-input pixels (for the review zip), the whole cells first, then the cells cut by the
 * image edge at or above edgeThreshold (``at_edge``: shown for review, never counted), as FieldResult.edge_cells. */
export async function classifyPixels(img, model, card) {
  const t0 = performance.now();
  const diameter = measureCellDiameter(img);
  const { cells: regions, edge } = diameter != null ? segmentFieldAndEdge(img, diameter) : { cells: [], edge: [] };
  const quality = assessField(img, regions, diameter);
  const t1 = performance.now();
  const cells = [];
  const stats = card?.unfamiliar?.statistics;
  const edgeMin = edgeThreshold(card);
  const classify = async (region, atEdge = false) => {
    const cut = cutCell(img, region);
    const pixels = pillowResize(cut, model.size, model.size).data;
    return { region, cut, pixels, prob: await model.probability(pixels), atEdge };
  };
  const whole = [];
  for (const region of regions) whole.push(await classify(region));
  const atEdge = [];
  for (const region of edge) atEdge.push(await classify(region, true));
  const joined = await joinSplitCandidates(whole, edgeMin, diameter, classify);
  const found = await refitCandidates(img, joined, atEdge, edgeMin, diameter, classify);
  for (const { region, cut, pixels, prob, atEdge: isEdge } of found.concat(atEdge)) {
    if (isEdge && prob < edgeMin) continue;
    const [x, y, w, h] = region.box;
    cells.push({
      index: cells.length + 1, x, y, w, h, prob_parasitized: prob, prediction: decide(prob),
      unfamiliar: stats ? unfamiliarScore(colourFeatures(pixels), stats) : null, region, cut, at_edge: isEdge,
    });
  }
  const t2 = performance.now();
  return {
    width: img.width, height: img.height, diameter, cells, quality, warnings: quality.warnings,
    ms: { segment: t1 - t0, classify: t2 - t1 },
  };
}

/** fields.edge_threshold: the slide rule's candidate threshold, else the call threshold. */
export function edgeThreshold(card) {
  return card?.slide_rule?.candidate_threshold ?? C.model.threshold;
}

/** fields._boxes_meet: whether two boxes overlap or touch. */
const meet = (a, b) => a[0] <= b[0] + b[2] && b[0] <= a[0] + a[2] && a[1] <= b[1] + b[3] && b[1] <= a[1] + a[3];

/** fields.join_split_candidates: touching whole cells that both score at or above ``threshold`` and together make
 * one round cell (joinedRegion) become one cell, classified again (``classify(region)``); the whole cells in reading
 * order. ``whole``: [{region, prob, ...}] as classified. */
async function joinSplitCandidates(whole, threshold, diameter, classify) {
  const parts = whole.map((entry, i) => ({ region: entry.region, members: [i] })).filter((_, i) => whole[i].prob >= threshold);
  for (;;) {
    let pair = null;
    for (let a = 0; a < parts.length && !pair; a++) {
      for (let b = a + 1; b < parts.length && !pair; b++) {
        if (!meet(parts[a].region.box, parts[b].region.box)) continue;
        const region = joinedRegion(parts[a].region, parts[b].region, diameter);
        if (region) pair = [a, b, region];
      }
    }
    if (!pair) break;
    const [a, b, region] = pair;
    parts[a] = { region, members: parts[a].members.concat(parts[b].members) };
    parts.splice(b, 1);
  }
  const merged = parts.filter((p) => p.members.length > 1);
  if (!merged.length) return whole;
  const gone = new Set(merged.flatMap((p) => p.members));
  const entries = whole.filter((_, i) => !gone.has(i));
  for (const p of merged) entries.push(await classify(p.region));
  const before = readingOrder(diameter);
  return entries.sort((e, f) => before(e.region.box, f.region.box));
}

/** fields.refit_candidates: each whole cell scoring at or above ``threshold`` grown to its own colour
 * (refitOutline) is classified again; the whole cells in reading order. ``whole``/``edge``: [{region, prob, ...}]. */
async function refitCandidates(img, whole, edge, threshold, diameter, classify) {
  const pad = pyRound(C.segment.REFIT_PAD * diameter);
  const regions = whole.map((e) => e.region).concat(edge.map((e) => e.region));
  const entries = [];
  for (const entry of whole) {
    const [x, y, w, h] = entry.region.box;
    const reach = [x - pad, y - pad, w + 2 * pad, h + 2 * pad];
    const refit = entry.prob < threshold ? null
      : refitOutline(img, entry.region, regions.filter((r) => r !== entry.region && meet(reach, r.box)), diameter);
    entries.push(refit ? await classify(refit) : entry);
  }
  if (entries.every((e, i) => e === whole[i])) return whole;
  const before = readingOrder(diameter);
  return entries.sort((e, f) => before(e.region.box, f.region.box));
}
