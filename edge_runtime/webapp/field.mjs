// One field from pixels to calls, as edge_runtime/fields.classify_field_pixels: the cell diameter, the cells,
// the quality gate, then each cell cut on black, resized as Pillow does and classified, with its unfamiliar score.
import { colourFeatures, decide, pillowResize, unfamiliarScore } from './classify.mjs';
import { assessField, measureCellDiameter } from './quality.mjs';
import { cutCell, segmentField } from './segment.mjs';

/** Classify a decoded field {width, height, data RGB}: {width, height, diameter, cells, quality, warnings,
 * ms: {segment, classify}}; cells carry index (reading order, from 1), box, prob_parasitized, prediction,
 * unfamiliar and the model-input pixels (for the review zip). */
export async function classifyPixels(img, model, card) {
  const t0 = performance.now();
  const diameter = measureCellDiameter(img);
  const regions = diameter != null ? segmentField(img, diameter) : [];
  const quality = assessField(img, regions, diameter);
  const t1 = performance.now();
  const cells = [];
  const stats = card?.unfamiliar?.statistics;
  for (let i = 0; i < regions.length; i++) {
    const region = regions[i];
    const cut = cutCell(img, region);
    const pixels = pillowResize(cut, model.size, model.size).data;
    const prob = await model.probability(pixels);
    const [x, y, w, h] = region.box;
    cells.push({
      index: i + 1, x, y, w, h, prob_parasitized: prob, prediction: decide(prob),
      unfamiliar: stats ? unfamiliarScore(colourFeatures(pixels), stats) : null, region, cut,
    });
  }
  const t2 = performance.now();
  return {
    width: img.width, height: img.height, diameter, cells, quality, warnings: quality.warnings,
    ms: { segment: t1 - t0, classify: t2 - t1 },
  };
}
