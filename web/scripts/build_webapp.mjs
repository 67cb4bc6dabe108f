// Copy the page's runtime files from node_modules (installed by `npm ci` from package-lock.json) into the package
// data folder edge_runtime/webapp/vendor/ (gitignored: ~25 MB that would bloat the repository), each with a .gz
// sibling that edge-serve sends to browsers accepting gzip; then write vendor/precache.json, the service worker's
// versioned list of files (version = the card's SHA-256 + a hash of every file listed).
import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const web = join(dirname(fileURLToPath(import.meta.url)), '..');
const app = join(web, '..', 'edge_runtime', 'webapp');
const models = join(web, '..', 'edge_runtime', 'models');
const vendor = join(app, 'vendor');
const mod = (p) => join(web, 'node_modules', p);

const COPIES = [
  ['@techstark/opencv-js/dist/opencv.js', 'opencv.js'],
  ['@litertjs/core/dist/index.js', 'litert/index.js'],
  ['@litertjs/wasm-utils/dist/index.js', 'litert/wasm-utils.js'],
  // The page loads one of these two (relaxed SIMD or not); threads and JSPI are not used.
  ['@litertjs/core/wasm/litert_wasm_internal.js', 'litert/wasm/litert_wasm_internal.js'],
  ['@litertjs/core/wasm/litert_wasm_internal.wasm', 'litert/wasm/litert_wasm_internal.wasm'],
  ['@litertjs/core/wasm/litert_wasm_compat_internal.js', 'litert/wasm/litert_wasm_compat_internal.js'],
  ['@litertjs/core/wasm/litert_wasm_compat_internal.wasm', 'litert/wasm/litert_wasm_compat_internal.wasm'],
];
// Fetched on first use and then kept by the service worker, not precached: a phone uses one of the two.
const LAZY = /litert_wasm_(compat_)?internal\.(js|wasm)$/;

rmSync(vendor, { recursive: true, force: true });
for (const [from, to] of COPIES) {
  const target = join(vendor, to);
  mkdirSync(dirname(target), { recursive: true });
  copyFileSync(mod(from), target);
  writeFileSync(target + '.gz', gzipSync(readFileSync(target), { level: 9 }));
}

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    if (name.startsWith('.') || name === '__pycache__' || name.endsWith('.gz')) return [];
    return statSync(p).isDirectory() ? walk(p) : [p];
  });
}
const constants = JSON.parse(readFileSync(join(app, 'constants.json'), 'utf8'));
const files = walk(app).map((p) => relative(app, p).split('\\').join('/'))
  .filter((f) => f !== 'vendor/precache.json' && f !== 'sw.js').sort();
const hash = createHash('sha256');
for (const f of files) hash.update(f).update(readFileSync(join(app, f)));
for (const f of [constants.model.file, constants.model.card]) hash.update(readFileSync(join(models, f)));
const precache = files.filter((f) => !LAZY.test(f)).map((f) => (f === 'index.html' ? './' : f));
precache.push(`model/${constants.model.file}`, `model/${constants.model.card}`);
const version = `${constants.model.card_sha256.slice(0, 12)}-${hash.digest('hex').slice(0, 12)}`;
writeFileSync(join(vendor, 'precache.json'), JSON.stringify({ version, files: precache, lazy: files.filter((f) => LAZY.test(f)) }, null, 1));
// Files over 1 MB ship compressed only (edge-serve sends the .gz as it is, or unpacks it for a client without
// gzip): the package stays ~10 MB instead of ~40.
let shipped = 0;
for (const f of files) {
  const p = join(app, f);
  if (f.startsWith('vendor/') && statSync(p).size > 1e6) { shipped += statSync(p + '.gz').size; rmSync(p); } else if (f.startsWith('vendor/')) { rmSync(p + '.gz', { force: true }); shipped += statSync(p).size; }
}
console.log(`webapp: ${files.length} files, version ${version}, vendor ${(shipped / 1e6).toFixed(1)} MB as shipped`);
