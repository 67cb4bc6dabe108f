// The field overlay, as edge_runtime/overlay.draw_overlay draws it (Okabe-Ito, candidates thick vermillion and
// numbered with their slide rank, other cells thin sky blue, a caption band with the legend), with OpenCV.js.
// OpenCV.js has no getTextSize: Hershey Simplex's metrics (digits 20 units wide, 22 high) stand in for it.
import { cv, pyRound, toMat, withMats } from './cvutil.mjs';
import { loadConstants } from './constants.mjs';

const { overlay: O } = loadConstants();
const rgba = (c) => new (cv().Scalar)(c[0], c[1], c[2], 255);

function textSize(text, fontScale, thickness) {
  const w = Math.round(text.length * 20 * fontScale + thickness);
  return [[w, Math.round(22 * fontScale)], Math.round(10 * fontScale + thickness)];
}

/** field: {name, width, height, cells:[{index, x, y, w, h, at_edge, region:{mask}}]}, img RGB; ranks Map index -> rank.
 * Returns {width, height, data RGBA Uint8ClampedArray} ready for a canvas. */
export function drawOverlay(field, img, ranks) {
  const c = cv();
  return withMats((k) => {
    const rgb = k(toMat(img.data, img.height, img.width, c.CV_8UC3));
    const out = k(new c.Mat());
    c.cvtColor(rgb, out, c.COLOR_RGB2RGBA);
    const side = Math.max(img.width, img.height);
    const thin = Math.max(1, pyRound(side / 1000)); const thick = Math.max(3, pyRound(side / 300));
    const font = c.FONT_HERSHEY_SIMPLEX; const scale = Math.max(0.5, side / 1600.0);
    for (const cell of field.cells) {
      const rank = ranks.get(cell.index);
      const [colour, width] = rank !== undefined ? [O.VERMILLION, thick] : [O.SKY_BLUE, thin];
      if (cell.region?.mask) {
        const [bw, bh] = [cell.w, cell.h];
        const m = toMat(cell.region.mask, bh, bw, c.CV_8U);
        const contours = new c.MatVector(); const hier = new c.Mat();
        c.findContours(m, contours, hier, c.RETR_EXTERNAL, c.CHAIN_APPROX_SIMPLE);
        c.drawContours(out, contours, -1, rgba(colour), width, c.LINE_8, hier, 2147483647, new c.Point(cell.x, cell.y));
        m.delete(); contours.delete(); hier.delete();
      } else {
        c.rectangle(out, new c.Point(cell.x, cell.y), new c.Point(cell.x + cell.w, cell.y + cell.h), rgba(colour), width);
      }
    }
    for (const cell of field.cells) {
      const rank = ranks.get(cell.index);
      if (rank === undefined) continue;
      const label = String(rank);
      const [[tw, th], base] = textSize(label, 0.9 * scale, Math.max(1, thick - 1));
      const lx = Math.trunc(Math.min(Math.max(0, cell.x + cell.w - Math.floor(tw / 2)), img.width - tw - 6));
      const ly = Math.trunc(Math.max(th + 6, cell.y + Math.floor(th / 2)));
      c.rectangle(out, new c.Point(lx - 3, ly - th - 5), new c.Point(lx + tw + 3, ly + base), rgba(O.BLACK), -1);
      c.rectangle(out, new c.Point(lx - 3, ly - th - 5), new c.Point(lx + tw + 3, ly + base), rgba(O.ORANGE), Math.max(1, thin));
      c.putText(out, label, new c.Point(lx, ly), font, 0.9 * scale, rgba(O.WHITE), Math.max(1, thick - 1), c.LINE_AA);
    }
    const band = Math.trunc(40 * scale);
    const canvas = k(new c.Mat(img.height + band, img.width, c.CV_8UC4, new c.Scalar(255, 255, 255, 255)));
    const roi = canvas.roi(new c.Rect(0, band, img.width, img.height));
    out.copyTo(roi); roi.delete();
    const nCand = field.cells.filter((cell) => ranks.has(cell.index)).length;
    const nEdge = field.cells.filter((cell) => cell.at_edge && ranks.has(cell.index)).length;
    let caption = `${field.name}: ${field.cells.filter((cell) => !cell.at_edge).length} cells, ${nCand} candidate${nCand === 1 ? '' : 's'}`;
    if (nEdge) caption += ` (${nEdge} cut by the edge, not counted)`;
    c.putText(canvas, caption, new c.Point(Math.trunc(8 * scale), Math.trunc(band * 0.7)), font, 0.7 * scale, rgba(O.BLACK),
      Math.max(1, pyRound(1.5 * scale)), c.LINE_AA);
    let x = img.width;
    for (const [text, colour, width] of [['candidate (numbered)', O.VERMILLION, thick], ['other cell', O.SKY_BLUE, thin]]) {
      const [[tw]] = textSize(text, 0.6 * scale, 1);
      x -= tw + Math.trunc(40 * scale);
      const yc = Math.trunc(band * 0.5);
      c.line(canvas, new c.Point(x, yc), new c.Point(x + Math.trunc(22 * scale), yc), rgba(colour), width);
      c.putText(canvas, text, new c.Point(x + Math.trunc(28 * scale), Math.trunc(band * 0.7)), font, 0.6 * scale, rgba(O.BLACK),
        Math.max(1, pyRound(1.2 * scale)), c.LINE_AA);
    }
    return { width: canvas.cols, height: canvas.rows, data: new Uint8ClampedArray(canvas.data) };
  });
}
