// The status page: /cluster/status once a second, drawn as the ring in order.
"use strict";

const REFRESH_MS = 1000;
const { el, bytes, pct, ms } = zq;

function nodeCard(n, index) {
  const busy = Math.max(0, Math.min(1, n.busy_fraction || 0));
  const healthy = n.health === "ok";
  const layers = n.layers ? `[${n.layers[0]}, ${n.layers[1]})` : "none";
  const gpu = n.gpu_utilization;
  return el("article", { class: "node " + (healthy ? "ok" : "bad"), id: "node-" + n.name,
                         "data-node": n.name, "data-health": n.health },
    el("div", { class: "title" },
      index === null ? "" : el("span", { class: "stage" }, "stage " + index),
      el("span", { class: "name" }, n.name)),
    el("div", { class: "addr" }, (n.address || "?") + ":" + (n.data_port ?? "?")),
    el("div", { class: "health" }, n.health),
    el("div", { class: "row" }, el("span", { class: "label" }, "layers"),
       el("span", { class: "layers" }, layers)),
    el("div", { class: "row" }, el("span", { class: "label" }, "busy"),
       el("span", { class: "bar" }, el("span", { class: "fill", style: `width:${(busy * 100).toFixed(1)}%` })),
       el("span", { class: "busy" }, pct(busy))),
    el("div", { class: "row" }, el("span", { class: "label" }, "GPU"),
       gpu === null || gpu === undefined ? el("span", { class: "gpu absent" }, "n/a")
         : el("span", { class: "gpu" }, pct(gpu))),
    el("div", { class: "row" }, el("span", { class: "label" }, "memory"),
       el("span", { class: "mem" }, "rss " + bytes(n.rss_bytes) + " · shard " + bytes(n.shard_bytes)
          + " · KV " + bytes(n.kv_bytes)
          + (n.accel_memory_bytes === null || n.accel_memory_bytes === undefined ? ""
             : " · accel " + bytes(n.accel_memory_bytes)))),
    el("div", { class: "row" }, el("span", { class: "label" }, "tok/s"),
       el("span", { class: "tps" }, (n.tokens_per_s ?? 0).toFixed(1)),
       el("span", { class: "label" }, "step"), el("span", { class: "step" }, ms(n.step_s)),
       el("span", { class: "label" }, "hop"), el("span", { class: "hop" }, ms(n.hop_latency_s))),
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
