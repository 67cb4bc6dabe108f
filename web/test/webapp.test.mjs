// The page's modules against what the Python side answers (fixtures.json, written by tools/webapp_fixtures.py)
// and against the constants Python exports. Run: node --test test/ (in web/), or pytest tests/test_webapp_data.py.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

import { colourFeatures, pillowResize, unfamiliarScore } from '../../edge_runtime/webapp/classify.mjs';
import { loadConstants } from '../../edge_runtime/webapp/constants.mjs';
import { crc32, rowsToCsv, zip } from '../../edge_runtime/webapp/export.mjs';
import { fill } from '../../edge_runtime/webapp/report.mjs';
import { assessSlide, cellKey, isLeftOut, lgamma, pyG } from '../../edge_runtime/webapp/slide.mjs';
import { formatMessage } from '../../edge_runtime/webapp/quality.mjs';

const fixtures = JSON.parse(readFileSync(new URL('./fixtures.json', import.meta.url)));
const card = JSON.parse(readFileSync(new URL('../../edge_runtime/models/malaria.json', import.meta.url)));
const C = loadConstants();
const bytes = (b64) => new Uint8Array(Buffer.from(b64, 'base64'));

test('constants come from Python: the card digest, the columns, the template', () => {
  assert.equal(card.files[C.model.file].sha256, C.model.sha256);
  assert.deepEqual(C.results_io.CELL_COLUMNS.slice(0, 9), ['path', 'cell', 'x', 'y', 'w', 'h', 'at_edge', 'prediction', 'prob_parasitized']);
  assert.ok(C.report.TEMPLATE.includes('{{#slides}}'));
  assert.equal(C.segment.WORK_DIAMETER, 40);
});

test('cells resized as Pillow does, byte for byte; colour features and unfamiliar score as unfamiliar.py', () => {
  for (const f of fixtures.resize) {
    const out = pillowResize({ width: f.width, height: f.height, data: bytes(f.input) }, 48, 48);
    assert.deepEqual(Buffer.from(out.data), Buffer.from(bytes(f.output)), `${f.width}x${f.height}`);
    const feats = colourFeatures(bytes(f.output));
    feats.forEach((v, i) => assert.ok(Math.abs(v - f.features[i]) <= 1e-3 * Math.max(1, Math.abs(v)), `feature ${i}`));
    const score = unfamiliarScore(feats, card.unfamiliar.statistics);
    assert.ok(Math.abs(score - f.unfamiliar) <= 1e-3 * Math.max(1, f.unfamiliar), `${score} vs ${f.unfamiliar}`);
  }
});

test('a slide gets the same call, estimate, p-value and detection limit as slide.assess_slide', () => {
  for (const s of fixtures.slides) {
    const r = assessSlide(s.rows, card.slide_rule, { name: s.name, draws: s.draws });
    assert.equal(r.call, s.result.call, s.name);
    assert.equal(r.reason, s.result.reason, s.name);
    assert.equal(r.cells, s.result.cells);
    assert.equal(r.candidates, s.result.candidates);
    assert.deepEqual(r.candidate_list.map((c) => [c.rank, c.path, c.cell, isLeftOut(c)]), s.result.ranked, s.name);
    assert.deepEqual(r.warnings, s.result.warnings, s.name);
    if (s.result.parasitemia !== null) {
      assert.ok(Math.abs(r.parasitemia - s.result.parasitemia) < 1e-12);
      assert.ok(Math.abs(r.p_value - s.result.p_value) <= 1e-9 + 1e-9 * s.result.p_value, `${r.p_value} vs ${s.result.p_value}`);
      const width = s.result.parasitemia_ci[1] - s.result.parasitemia_ci[0];
      assert.ok(Math.abs(r.parasitemia_ci[1] - s.result.parasitemia_ci[1]) <= 0.1 * width + 1e-4, `${r.parasitemia_ci} vs ${s.result.parasitemia_ci}`);
    }
    assert.ok(Math.abs(r.detection_limit - s.result.detection_limit) < 1e-12);
    const reviewed = new Set(s.reviewed_keys.map(([path, cell]) => cellKey({ path, cell })));
    const rr = assessSlide(s.rows, card.slide_rule, { name: s.name, reviewed, draws: s.draws });
    assert.equal(rr.call, s.reviewed.call); assert.equal(rr.reason, s.reviewed.reason); assert.equal(rr.confirmed, s.reviewed.confirmed);
  }
});

test('the report template is filled as report.fill fills it', () => {
  assert.equal(fill(C.report.TEMPLATE, fixtures.report.data), fixtures.report.html);
});

test('numbers are written as Python writes them', () => {
  assert.equal(pyG(1.234e-5, 2), '1.2e-05');
  assert.equal(pyG(0.0123, 2), '0.012');
  assert.equal(pyG(0.01, 6), '0.01');
  assert.ok(Math.abs(lgamma(10) - Math.log(362880)) < 1e-10);
  assert.equal(formatMessage('{a:.2f} {b:.0%} {c}', { a: 1.236, b: 0.123, c: 'x' }), '1.24 12% x');
});

test('CSV rows have edge-classify columns; the zip is a valid stored zip', () => {
  const csv = rowsToCsv([{ path: 'a,b.jpg', cell: 1, x: 1, y: 2, w: 3, h: 4, prediction: 'uninfected', prob_parasitized: 0.1 }]);
  assert.equal(csv.split('\r\n')[0], C.results_io.CELL_COLUMNS.join(','));
  assert.ok(csv.includes('"a,b.jpg",1,1,2,3,4,,uninfected,0.1'));
  assert.equal(crc32(new TextEncoder().encode('123456789')), 0xcbf43926);
  const z = zip([{ name: 'Parasitized/a.png', bytes: new Uint8Array([1, 2, 3]) }]);
  assert.equal(new DataView(z.buffer).getUint32(0, true), 0x04034b50);
  assert.equal(new DataView(z.buffer).getUint32(z.length - 22, true), 0x06054b50);
});

test('OpenCV.js has the calls the segmentation port needs', async () => {
  const require = createRequire(import.meta.url);
  let cv = require('@techstark/opencv-js');
  if (typeof cv.then === 'function' && !cv.Mat) cv = await cv;
  for (const name of ['HoughCircles', 'distanceTransform', 'distanceTransformWithLabels', 'connectedComponentsWithStats', 'kmeans', 'setRNGSeed', 'findContours', 'convexHull', 'fillPoly', 'dilate', 'morphologyEx']) {
    assert.equal(typeof cv[name], 'function', name);
  }
  assert.equal(typeof cv.HOUGH_GRADIENT_ALT, 'number');
});
