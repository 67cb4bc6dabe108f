// A photo file to RGB pixels as edge_runtime/images.open_image gives them: EXIF orientation applied, the embedded
// colour profile ignored (Pillow ignores it too), alpha composited on black.
export async function decodeImage(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  } catch (err) {
    throw new Error(`this file is not an image the browser can read (${err.message || err})`);
  }
  const { width, height } = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  return rgbaToRgb(ctx.getImageData(0, 0, width, height).data, width, height);
}

export function rgbaToRgb(rgba, width, height) {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    const a = rgba[i + 3];
    if (a === 255) { data[j] = rgba[i]; data[j + 1] = rgba[i + 1]; data[j + 2] = rgba[i + 2]; } else {
      data[j] = Math.round(rgba[i] * a / 255); data[j + 1] = Math.round(rgba[i + 1] * a / 255); data[j + 2] = Math.round(rgba[i + 2] * a / 255);
    }
  }
  return { width, height, data };
}
