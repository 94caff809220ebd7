// The status page: /cluster/status once a second, drawn as the ring in order.
"use strict";

const REFRESH_MS = 1000;
const { el, bytes, pct, ms } = zq;

function nodeCard(n, index) {
  const busy = Math.max(0, Math.min(1, n.busy_fraction || 0));
  const healthy = n.health === "ok";
  const layers = n.layers ? `[${n.layers[0]}, ${n.layers[1]})` : "none";
  const absent = v => v === null || v === undefined;
  const row = (label, cls, value) => [el("span", { class: "label" }, label), el("span", { class: cls }, value)];
  const rows = [
    ...row("layers", "layers", layers + (n.layers_held ? ` · ${n.layers_held} loaded` : "")),
    el("span", { class: "label" }, "busy"),
    el("span", { class: "busyrow" },
       el("span", { class: "bar" }, el("span", { class: "fill", style: `width:${(busy * 100).toFixed(1)}%` })),
       el("span", { class: "busy" }, pct(busy))),
    ...row("GPU", absent(n.gpu_utilization) ? "gpu absent" : "gpu", pct(n.gpu_utilization)),
    ...row("memory", "mem", bytes(n.rss_bytes) + " resident"),
    ...row("weights", "shard", bytes(n.shard_bytes)),
    ...row("KV cache", "kv", bytes(n.kv_bytes) + ` · ${n.sequences ?? 0} seq`),
    ...row("accel mem", absent(n.accel_memory_bytes) ? "accel absent" : "accel", bytes(n.accel_memory_bytes)),
    ...row("tok/s", "tps", (n.tokens_per_s ?? 0).toFixed(1)),
    ...row("step", "step", ms(n.step_s)),
    ...row("hop", "hop", ms(n.hop_latency_s)),
  ];
  return el("article", { class: "node " + (healthy ? "ok" : "bad"), id: "node-" + n.name,
                         "data-node": n.name, "data-health": n.health },
    el("div", { class: "title" },
      index === null ? "" : el("span", { class: "stage" }, "stage " + index),
      el("span", { class: "name" }, n.name)),
    el("div", { class: "addr" }, (n.address || "?") + ":" + (n.data_port ?? "?")),
    el("div", { class: "health" }, n.health),
    el("div", { class: "grid" }, ...rows),
  );
}

function draw(st) {
  const summary = document.getElementById("summary");
  summary.dataset.state = st.ready ? "ready" : "down";
  document.getElementById("state").textContent = st.ready ? "ready" : "not ready: " + (st.reason || "?");
  document.getElementById("model").textContent = `${st.model} (${st.n_layers} layers)`;
  document.getElementById("epoch").textContent = st.epoch;
  const tp = st.throughput || {};
  document.getElementById("toks").textContent = (tp.generation_tokens_per_s ?? 0).toFixed(1) + " tok/s";
  document.getElementById("ttft").textContent = ms(tp.ttft_s);
  document.getElementById("running").textContent = st.running_requests ?? "-";
  document.getElementById("waiting").textContent = st.waiting_requests ?? "-";
  document.getElementById("replans").textContent = st.ring ? st.ring.replans : "-";

  // Ring order: the gateway lists ring members first, in stage order (layers ascending).
  const nodes = st.nodes || [];
  const inRing = nodes.filter(n => n.layers).sort((a, b) => a.layers[0] - b.layers[0]);
  const others = nodes.filter(n => !n.layers);
  const ring = document.getElementById("ring");
  const cards = [el("div", { class: "hop-end" }, "gateway")];
  inRing.forEach((n, i) => { cards.push(el("div", { class: "arrow" }, "→"), nodeCard(n, i)); });
  cards.push(el("div", { class: "arrow" }, "→"), el("div", { class: "hop-end" }, "gateway"));
  ring.replaceChildren(...cards);
  document.getElementById("others").replaceChildren(...others.map(n => nodeCard(n, null)));
  document.getElementById("others-title").hidden = others.length === 0;
  document.getElementById("updated").textContent = "Last update " + new Date().toLocaleTimeString() + ".";
}

async function refresh() {
  try {
    draw(await zq.getJSON("/cluster/status", 3000));
  } catch (e) {
    const summary = document.getElementById("summary");
    summary.dataset.state = "gone";
    document.getElementById("state").textContent = "gateway unreachable: " + e.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
