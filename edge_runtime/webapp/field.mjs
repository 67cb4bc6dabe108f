// One field from pixels to calls, as edge_runtime/fields.classify_field_pixels: the cell diameter, the cells,
// the quality gate, then each cell cut on black, resized as Pillow does and classified, with its unfamiliar score.
import { colourFeatures, decide, pillowResize, unfamiliarScore } from './classify.mjs';
import { assessField, measureCellDiameter } from './quality.mjs';
import { loadConstants } from './constants.mjs';
import { cutCell, segmentFieldAndEdge } from './segment.mjs';

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
  const all = regions.concat(edge);
  const edgeMin = edgeThreshold(card);
  for (let i = 0; i < all.length; i++) {
    const region = all[i];
    const cut = cutCell(img, region);
    const pixels = pillowResize(cut, model.size, model.size).data;
    const prob = await model.probability(pixels);
    const atEdge = i >= regions.length;
    if (atEdge && prob < edgeMin) continue;
    const [x, y, w, h] = region.box;
    cells.push({
      index: cells.length + 1, x, y, w, h, prob_parasitized: prob, prediction: decide(prob),
      unfamiliar: stats ? unfamiliarScore(colourFeatures(pixels), stats) : null, region, cut, at_edge: atEdge,
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
