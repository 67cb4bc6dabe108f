// Slides kept on the phone (IndexedDB, this origin only): each slide {name, fields: [{id, name, photo Blob,
// width, height, warnings, messages, cells}], review: {cellKey: 'confirmed' | 'rejected'}}. Nothing leaves the phone.
const DB = 'malaria-edge'; const STORE = 'slides';

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: 'name' });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function tx(mode, fn) {
  const db = await open();
  try {
    return await new Promise((resolve, reject) => {
      const t = db.transaction(STORE, mode);
      const request = fn(t.objectStore(STORE));
      t.oncomplete = () => resolve(request.result);
      t.onerror = () => reject(t.error);
    });
  } finally { db.close(); }
}

export const listSlides = async () => (await tx('readonly', (s) => s.getAll())) ?? [];
export const getSlide = async (name) => (await tx('readonly', (s) => s.get(name))) ?? null;
export const putSlide = (slide) => tx('readwrite', (s) => s.put(slide));
export const deleteSlide = (name) => tx('readwrite', (s) => s.delete(name));

/** Add a classified field to the slide ``name`` (made when new); its name made unique within the slide. */
export async function addField(name, field) {
  const slide = (await getSlide(name)) ?? { name, fields: [], review: {}, created: new Date().toISOString() };
  const taken = new Set(slide.fields.map((f) => f.name));
  let fieldName = field.name; let n = 2;
  while (taken.has(fieldName)) fieldName = field.name.replace(/(\.[^.]*)?$/, (ext) => `-${n++}${ext || ''}`);
  slide.fields.push({ ...field, name: fieldName, id: `${Date.now()}-${slide.fields.length}` });
  await putSlide(slide);
  return slide;
}
