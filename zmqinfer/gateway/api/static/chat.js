// The chat: the conversation so far goes to /v1/chat/completions with stream:true; the answer
// is read from the response body as it arrives (fetch + ReadableStream, server-sent events).
"use strict";

const { el } = zq;
const history = [];
// ?max_tokens=N and ?temperature=T preset the request (temperature 0: the same answer each time).
const temperature = zq.params.get("temperature") === null ? null : parseFloat(zq.params.get("temperature"));
if (zq.params.get("max_tokens")) document.getElementById("max").value = zq.params.get("max_tokens");
let running = null; // the AbortController of the answer being streamed

function bubble(role, text) {
  const b = el("div", { class: "msg " + role, "data-role": role }, el("div", { class: "who" }, role),
               el("div", { class: "text" }, text));
  document.getElementById("log").append(b);
  b.scrollIntoView({ block: "end" });
  return b;
}

// One SSE event ("data: {...}") -> the text it adds, or a finish/error marker.
function handleEvent(data, answer, state) {
  if (data === "[DONE]") { state.done = true; return; }
  const msg = JSON.parse(data);
  if (msg.error) { throw new Error(msg.error.message || "the gateway reported an error"); }
  for (const choice of msg.choices || []) {
    if (choice.delta && choice.delta.content) {
      state.text += choice.delta.content;
      state.chunks += 1;
      answer.querySelector(".text").textContent = state.text;
    }
    if (choice.finish_reason) state.finish = choice.finish_reason;
  }
  if (msg.usage) state.usage = msg.usage;
}

async function send(question) {
  const maxTokens = parseInt(document.getElementById("max").value, 10) || 256;
  history.push({ role: "user", content: question });
  bubble("user", question);
  const answer = bubble("assistant", "");
  answer.dataset.state = "streaming";
  const state = { text: "", finish: null, usage: null, done: false, chunks: 0 };
  running = new AbortController();
  setBusy(true);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", signal: running.signal,
      headers: zq.headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(Object.assign(
        { model: "default", messages: history, max_tokens: maxTokens, stream: true,
          stream_options: { include_usage: true } },
        temperature === null ? {} : { temperature })),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `${r.status} ${r.statusText}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (!state.done) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) handleEvent(line.slice(6), answer, state);
        }
      }
    }
    history.push({ role: "assistant", content: state.text });
    answer.dataset.state = "done";
    answer.dataset.finish = state.finish || "";
    answer.dataset.chunks = state.chunks; // how many pieces the answer arrived in
    const meta = state.usage ? `${state.usage.completion_tokens} tokens · finish: ${state.finish}`
                             : `finish: ${state.finish}`;
    answer.append(el("div", { class: "meta" }, meta));
  } catch (e) {
    answer.dataset.state = "error";
    answer.append(el("div", { class: "meta error" }, e.name === "AbortError" ? "stopped" : "error: " + e.message));
    history.pop(); // the question goes again with the next one only if it was answered
  } finally {
    running = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  document.getElementById("send").disabled = busy;
  document.getElementById("stop").disabled = !busy;
}

document.getElementById("form").addEventListener("submit", ev => {
  ev.preventDefault();
  const input = document.getElementById("input");
  const q = input.value.trim();
  if (!q || running) return;
  input.value = "";
  send(q);
});
document.getElementById("input").addEventListener("keydown", ev => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    document.getElementById("form").requestSubmit();
  }
});
document.getElementById("stop").addEventListener("click", () => running && running.abort());

if (zq.params.get("q")) send(zq.params.get("q"));
