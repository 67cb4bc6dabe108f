// The offline copy: on install, every file of vendor/precache.json (the versioned list written by
// web/scripts/build_webapp.mjs; its version follows the model card's SHA-256 and every file's content) goes into
// one cache named by that version; the runtime wasm the browser picks is kept on first use. Cache first, same
// origin only; an old version's cache is dropped when a new one activates.
const VERSION = new URL(self.location.href).searchParams.get('v') || 'dev';
const CACHE = `malaria-edge-${VERSION}`;

self.addEventListener('install', (event) => {
  event.waitUntil((async () => {
    const list = await (await fetch('vendor/precache.json', { cache: 'no-cache' })).json();
    const cache = await caches.open(CACHE);
    await cache.addAll([...list.files, 'vendor/precache.json'].map((f) => new Request(f, { cache: 'no-cache' })));
    await self.skipWaiting();
  })());
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) if (key.startsWith('malaria-edge-') && key !== CACHE) await caches.delete(key);
    await self.clients.claim();
  })());
});

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== self.location.origin) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    const key = url.pathname.endsWith('/') ? new Request(new URL('./', self.location.href)) : event.request;
    const hit = await cache.match(key, { ignoreSearch: true });
    if (hit) return hit;
    const response = await fetch(event.request);
    if (response.ok && url.pathname.includes('/vendor/litert/wasm/')) await cache.put(event.request, response.clone());
    return response;
  })());
});
