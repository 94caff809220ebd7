// Shared by the status page and the chat: the API key (if any) and small formatters.
// A key given once as ?key=... is kept in localStorage, so later visits need no parameter.
"use strict";

const zq = (() => {
  const params = new URLSearchParams(location.search);
  if (params.get("key")) localStorage.setItem("zmqinfer_key", params.get("key"));

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = localStorage.getItem("zmqinfer_key");
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // fetch with a deadline: a gateway that is gone must show as gone, not as a spinner.
  async function getJSON(path, timeoutMs) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), timeoutMs || 3000);
    try {
      const r = await fetch(path, { headers: headers(), signal: ctl.signal, cache: "no-store" });
      const body = await r.json();
      if (!r.ok && body && body.error) throw new Error(body.error.message || r.statusText);
      return body;
    } finally {
      clearTimeout(timer);
    }
  }

  function bytes(n) {
    if (n === null || n === undefined) return "n/a";
    if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(1) + " GiB";
    if (n >= 2 ** 20) return (n / 2 ** 20).toFixed(0) + " MiB";
    if (n >= 2 ** 10) return (n / 2 ** 10).toFixed(0) + " KiB";
    return n + " B";
  }

  function pct(ratio) {
    return ratio === null || ratio === undefined ? "n/a" : Math.round(ratio * 100) + "%";
  }

  function ms(seconds) {
    return seconds === null || seconds === undefined ? "n/a" : (seconds * 1000).toFixed(1) + " ms";
  }

  // Build an element: el("div", {class: "x"}, "text", child, ...). Text is never parsed as HTML:
  // node names and health strings come from the network.
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "style") e.style.cssText = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  return { headers, getJSON, bytes, pct, ms, el, params };
})();
