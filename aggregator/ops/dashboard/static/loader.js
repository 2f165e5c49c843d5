// Loads the vendored libraries (MQTT.js, uPlot) and resolves window.fedmqVendor when both run.
//
// Mosquitto's http_dir serves files as they are, without compression, so the page fetches
// the gzip copies (vendor/*.gz, 127 kB instead of 393 kB) and inflates them in the browser
// (DecompressionStream: Chromium 80+, Firefox 113+, Safari 16.4+). A browser without it,
// or any failure on that path, falls back to the plain file.
"use strict";

(function () {
  function addScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = () => resolve();
      s.onerror = () => reject(new Error(`could not load ${src}`));
      document.head.appendChild(s);
    });
  }

  async function inflated(path) {
    const res = await fetch(`${path}.gz`, { cache: "no-cache" });
    if (!res.ok || !res.body) throw new Error(`${path}.gz: HTTP ${res.status}`);
    const text = await new Response(res.body.pipeThrough(new DecompressionStream("gzip"))).text();
    const url = URL.createObjectURL(new Blob([text], { type: "text/javascript" }));
    try {
      await addScript(url);
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  async function load(path, globalName) {
    if (typeof DecompressionStream === "function") {
      try {
        await inflated(path);
        if (window[globalName]) return "gzip";
      } catch (e) {
        console.warn(`fedmq: ${e.message}; loading ${path} uncompressed`);
      }
    }
    await addScript(path);
    if (!window[globalName]) throw new Error(`${path} did not define ${globalName}`);
    return "plain";
  }

  window.fedmqVendor = Promise.all([
    load("vendor/mqtt.min.js", "mqtt"),
    load("vendor/uPlot.iife.min.js", "uPlot"),
  ]);
})();
