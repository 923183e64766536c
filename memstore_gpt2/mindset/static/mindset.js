// memstore Mindset: plain JavaScript over the server's JSON API (no build step).
// Every text from the model or the database is put in the page with textContent, never as HTML.
"use strict";

const state = { info: null, trace: null, picked: null, off: {},
  chat: { messages: [], replies: [], picked: null } };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) {
    showError(data.error || `request failed (${response.status})`);
    throw new Error(data.error);
  }
  showError("");
  return data;
}

function busy(button, on) { if (button) button.disabled = on; }

// A layer by its collection name, as /api/info describes it.
function layerInfo(name) {
  return (state.info.layers.find((l) => l.name === name) || {});
}

// A grown block's two layers say where they sit: "layer0 (block 0)", "layer0.extra (block 0 extra)".
function layerLabel(name) {
  const info = layerInfo(name);
  return info.part ? `${name} (${info.title})` : name;
}

// Product-key rows (a grown block's extra rows) have fixed addresses: they can be zeroed, not deleted.
function isProductKey(name) { return layerInfo(name).kind === "ProductKeyMemory"; }

// A token as shown: line breaks and tabs made visible, so every token stays one short chip.
function shown(token) {
  return token.replace(/\r?\n/g, "↵").replace(/\t/g, "→") || "∅";
}

function tokenChip(item, down = false) {
  return el("span", { class: down ? "tok down" : "tok", title: `${JSON.stringify(item.token)} logit ${item.logit}`,
    text: shown(item.token) });
}

function offCount() {
  return Object.values(state.off).reduce((n, ids) => n + ids.size, 0);
}

function isOff(layer, id) { return Boolean(state.off[layer] && state.off[layer].has(id)); }

function setOff(layer, id, on) {
  state.off[layer] = state.off[layer] || new Set();
  if (on) state.off[layer].add(id); else state.off[layer].delete(id);
  renderOffList();
  if (state.picked !== null) renderFired(state.picked);
}

function renderOffList() {
  const box = $("off-list");
  const parts = Object.entries(state.off).filter(([, ids]) => ids.size)
    .map(([layer, ids]) => `${layer}: ${[...ids].sort((a, b) => a - b).join(", ")}`);
  box.textContent = parts.length ? `Switched off (in memory only, never written): ${parts.join("; ")}`
    : "No row switched off: tick “off” beside a row above.";
  $("ablated-title").textContent = `with ${offCount()} row(s) off`;
}

// ------------------------------------------------------------------ 1. trace
async function doTrace(event) {
  if (event) event.preventDefault();
  const button = $("trace-btn");
  busy(button, true);
  try {
    state.trace = await api("/api/trace", { prompt: $("prompt").value, top: Number($("top").value) });
    renderTokens();
    pickToken(state.trace.tokens.length - 1);
  } finally { busy(button, false); }
}

function renderTokens() {
  const box = $("tokens");
  box.replaceChildren(...state.trace.tokens.map((token, i) =>
    el("button", { type: "button", class: "token", "data-index": i, title: `token ${i}: ${JSON.stringify(token)}`, text: shown(token),
      onclick: () => pickToken(i) })));
  const every = Object.entries(state.trace.layers).filter(([, l]) => l.every_token.length)
    .map(([name, l]) => `${name}: ${l.every_token.join(", ")}`);
  $("every").textContent = every.length && state.trace.tokens.length > 1
    ? `Read at every token (a constant of the layer more than a memory): ${every.join("; ")}` : "";
}

function pickToken(i) {
  state.picked = i;
  for (const chip of document.querySelectorAll("#tokens .token")) {
    chip.classList.toggle("picked", Number(chip.dataset.index) === i);
  }
  $("picked").textContent = `— token ${i} ${JSON.stringify(state.trace.tokens[i])}`;
  renderFired(i);
}

function renderFired(i) {
  $("fired").replaceChildren(...firedTables(state.trace, i));
}

// The rows each layer read at token i of a trace (the trace panel's, or a chat reply's); with
// switches, each row has its "off" box for panel 3 (the chat replies with every row as stored).
function firedTables(trace, i, switches = true) {
  const parts = [];
  for (const [name, layer] of Object.entries(trace.layers)) {
    const labels = trace.labels[name] || {};
    const rows = layer.ids[i].map((id, j) => {
      const label = labels[String(id)] || { promotes: [] };
      const off = switches && isOff(name, id);
      const cells = [
        el("td", {}, el("a", { class: "rid", text: String(id), onclick: () => explain(name, id) })),
        el("td", { class: "num", text: layer.weights[i][j].toFixed(3) }),
        el("td", { class: "num", text: layer.contributions[i][j].toFixed(3) }),
        el("td", {}, ...label.promotes.map((t) => tokenChip(t)))];
      if (switches) {
        cells.push(el("td", {}, el("label", {}, el("input", { type: "checkbox", class: "off-box", checked: off,
          onchange: (e) => setOff(name, id, e.target.checked) }), " off")));
      }
      return el("tr", { class: off ? "off" : "", "data-layer": name, "data-id": id }, ...cells);
    });
    const head = ["row", "weight", "size", "promotes"].concat(switches ? [""] : []);
    parts.push(el("div", { class: "layer-name", text: `${layerLabel(name)} — ${layer.selected} rows read, largest ${layer.ids[i].length} shown` }),
      el("table", { class: "fired", "data-layer": name },
        el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
        el("tbody", {}, ...rows)));
  }
  return parts;
}

// ------------------------------------------------------------------ 3. regenerate
async function regenerate() {
  const button = $("regen-btn");
  busy(button, true);
  try {
    const off = {};
    for (const [layer, ids] of Object.entries(state.off)) if (ids.size) off[layer] = [...ids];
    const result = await api("/api/generate", {
      prompt: $("prompt").value, off, max_new_tokens: Number($("new-tokens").value),
    });
    $("gen-normal").textContent = result.normal;
    $("gen-ablated").textContent = result.ablated;
  } finally { busy(button, false); }
}

// ------------------------------------------------------------------ 6. chat
// The page keeps the conversation and sends it whole with every message (the server keeps none).
function chatOptions() {
  const seed = $("chat-seed").value;
  const options = {
    max_tokens: Number($("chat-max-tokens").value), temperature: Number($("chat-temperature").value),
    seed: seed === "" ? null : Number(seed),
  };
  if (state.info.packs.length) {  // the packs ticked act on the reply ([]: the bare student)
    options.pack = [...document.querySelectorAll("#chat-packs input:checked")].map((box) => box.value);
  }
  return options;
}

// One box per knowledge pack the session attached, all ticked: each reply uses the packs ticked.
function renderChatPacks() {
  const holder = $("chat-packs");
  holder.hidden = !state.info.packs.length;
  holder.replaceChildren("packs:", ...state.info.packs.map((name) => el("label", {},
    el("input", { type: "checkbox", value: name, checked: true, "data-pack": name }), ` ${name}`)));
}

function userMessage(text) {
  return el("div", { class: "msg user" }, el("div", { class: "who", text: "you" }),
    el("div", { class: "text", text }));
}

function replyMessage(reply, r) {
  const chips = reply.tokens.map((token, i) => el("button", {
    type: "button", class: "token", "data-reply": r, "data-index": i,
    title: `reply token ${i}: ${JSON.stringify(token)}`, text: shown(token),
    onclick: () => pickChatToken(r, i),
  }));
  const body = chips.length ? el("div", { class: "tokens" }, ...chips)
    : el("div", { class: "muted", text: "(an empty reply: the model began the next turn at once)" });
  let note = reply.finish_reason === "length" ? ` · cut at ${reply.max_tokens} tokens` : "";
  if (state.info.packs.length) note += ` · packs: ${reply.packs.join(", ") || "none"}`;
  return el("div", { class: "msg assistant", "data-reply": r, title: `the prompt the model continued:\n${reply.prompt}` },
    el("div", { class: "who", text: `student · ${reply.tokens.length} tokens${note}` }), body);
}

function pickChatToken(r, i) {
  state.chat.picked = { r, i };
  for (const chip of document.querySelectorAll("#chat-log .token")) {
    chip.classList.toggle("picked", Number(chip.dataset.reply) === r && Number(chip.dataset.index) === i);
  }
  $("chat-picked").textContent = `— reply ${r + 1}, reply token ${i} ${JSON.stringify(state.chat.replies[r].tokens[i])}`;
  renderChatFired();
}

function renderChatFired() {
  const { r, i } = state.chat.picked;
  $("chat-fired").replaceChildren(...firedTables(state.chat.replies[r], i, false));
}

async function sendChat(event) {
  if (event) event.preventDefault();
  const text = $("chat-input").value;
  if (!text.trim()) return;
  const button = $("chat-send");
  busy(button, true);
  const log = $("chat-log");
  const pending = el("div", { class: "msg assistant pending", text: "the student is writing…" });
  const asked = userMessage(text);
  log.append(asked, pending);
  $("chat-input").value = "";
  const messages = [...state.chat.messages, { role: "user", content: text }];
  try {
    const reply = await api("/api/chat", { messages, ...chatOptions() });
    state.chat.messages = [...messages, { role: "assistant", content: reply.reply }];
    state.chat.replies.push(reply);
    pending.replaceWith(replyMessage(reply, state.chat.replies.length - 1));
  } catch (e) {  // nothing was said: the message goes back to the box (api() showed the error)
    asked.remove();
    pending.remove();
    $("chat-input").value = text;
  } finally {
    busy(button, false);
    log.scrollTop = log.scrollHeight;
  }
}

function resetChat() {
  state.chat = { messages: [], replies: [], picked: null };
  $("chat-log").replaceChildren();
  $("chat-fired").replaceChildren();
  $("chat-picked").textContent = "— pick a reply token";
}

// ------------------------------------------------------------------ 4. rows and explain
async function browseRows(event) {
  if (event) event.preventDefault();
  const params = new URLSearchParams({
    layer: $("rows-layer").value, sort: $("rows-sort").value, limit: $("rows-limit").value,
    ascending: $("rows-asc").checked ? "1" : "0",
  });
  const promotes = $("rows-promotes").value;
  if (promotes) params.set("promotes", promotes);
  const button = $("rows-btn");
  busy(button, true);
  try {
    const result = await api(`/api/rows?${params}`);
    const what = result.promotes !== undefined ? ` promoting ${JSON.stringify(result.promotes)}` : "";
    $("rows-summary").textContent = `${result.layer}: ${result.matched} of ${result.total} rows${what} · clock ${result.clock}`;
    const head = ["row", "hits", "score", "age", "promotes", "suppresses"];
    if (result.promotes !== undefined) head.splice(4, 0, "rank");
    const body = result.rows.map((r) => {
      const cells = [
        el("td", {}, el("a", { class: "rid", text: String(r.id), onclick: () => explain(result.layer, r.id) })),
        el("td", { class: "num", text: String(r.hits) }),
        el("td", { class: "num", text: r.score === null ? "n/a" : r.score.toFixed(2) }),
        el("td", { class: "num", text: String(r.age) }),
        el("td", {}, ...r.promotes.map((t) => tokenChip(t))),
        el("td", {}, ...r.suppresses.slice(0, 3).map((t) => tokenChip(t, true))),
      ];
      if (r.token_rank !== undefined) cells.splice(4, 0, el("td", { class: "num", text: String(r.token_rank) }));
      return el("tr", { "data-id": r.id }, ...cells);
    });
    $("rows-table").replaceChildren(el("table", { id: "rows-result" },
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))), el("tbody", {}, ...body)));
  } finally { busy(button, false); }
}

async function explain(layer, id) {
  const result = await api(`/api/explain?${new URLSearchParams({ layer, ids: String(id) })}`);
  const r = result.rows[0];
  $("explain-title").textContent = `— ${layer} row ${id}`;
  const address = r.address ? `product key [${r.address.join(", ")}] · ` : "";
  $("explain").replaceChildren(
    el("p", { text: `${address}LRFU score ${r.score === null ? "n/a" : r.score.toFixed(2)} · ${r.hits} hits · age ${r.age} ticks · last hit ${r.idle} ticks ago · |value| ${r.value_norm.toFixed(3)}` }),
    el("div", {}, el("h3", { text: "promotes" }), ...r.promotes.map((t) => tokenChip(t))),
    el("div", {}, el("h3", { text: "suppresses" }), ...r.suppresses.map((t) => tokenChip(t, true))),
    el("div", { class: "row" },
      el("button", { type: "button", text: isOff(layer, id) ? "switch back on" : "switch off",
        onclick: () => { setOff(layer, id, !isOff(layer, id)); explain(layer, id); } }),
      el("button", { type: "button", id: "use-in-edit", text: "use in edit",
        onclick: () => { $("edit-layer").value = layer; $("edit-ids").value = String(id); } })));
}

// ------------------------------------------------------------------ 5. edit
function editRequest(confirm) {
  return {
    layer: $("edit-layer").value, action: $("edit-action").value, ids: $("edit-ids").value,
    factor: $("edit-action").value === "scale" ? Number($("edit-factor").value) : null,
    prompt: $("prompt").value, confirm, max_new_tokens: Number($("new-tokens").value),
  };
}

// Delete is offered only where rows can be deleted (not product-key rows: zero them instead).
function fitEditActions() {
  const fixed = isProductKey($("edit-layer").value);
  const del = $("edit-action").querySelector('option[value="delete"]');
  del.disabled = fixed;
  del.title = fixed ? "product-key rows have fixed addresses: zero them instead" : "";
  if (fixed && $("edit-action").value === "delete") {
    $("edit-action").value = "zero";
    $("factor-label").hidden = true;
  }
}

async function previewEdit(event) {
  event.preventDefault();
  $("edit-result").hidden = true;
  const button = $("edit-preview");
  busy(button, true);
  try {
    const plan = await api("/api/edit", editRequest(false));
    $("edit-description").textContent = `Would ${plan.description} (${plan.layer}: ${plan.rows_before} → ${plan.rows_after} rows). Nothing is written until you confirm.`;
    $("edit-before").textContent = plan.before || "";
    $("edit-after").textContent = plan.after || "";
    $("edit-after-title").textContent = "after (preview)";
    $("edit-plan").hidden = false;
  } finally { busy(button, false); }
}

async function confirmEdit() {
  const button = $("edit-confirm");
  busy(button, true);
  try {
    const done = await api("/api/edit", editRequest(true));
    $("edit-plan").hidden = true;
    const box = $("edit-result");
    box.textContent = `Done: ${done.description} — written in one transaction; the student was loaded again (${done.layer}: ${done.rows_before} → ${done.rows_after} rows).`;
    box.hidden = false;
    if (done.action === "delete" && state.off[done.layer]) for (const id of done.ids) state.off[done.layer].delete(id);
    renderOffList();
    await doTrace();
  } finally { busy(button, false); }
}

// ------------------------------------------------------------------ start
async function init() {
  state.info = await api("/api/info");
  $("student").textContent = `${state.info.student} · ${state.info.layers.map((l) => `${layerLabel(l.name)}: ${l.rows} rows, k ${l.k}`).join(" · ")}`;
  const mode = $("mode");
  mode.textContent = state.info.allow_edits ? "edits allowed" : "read-only";
  mode.classList.toggle("edits", state.info.allow_edits);
  for (const select of [$("rows-layer"), $("edit-layer")]) {
    select.replaceChildren(...state.info.layers.map((l) => el("option", { value: l.name, text: layerLabel(l.name) })));
  }
  if (!state.info.allow_edits) {
    $("edit-readonly").hidden = false;
    for (const field of $("edit-form").elements) field.disabled = true;
  }
  $("trace-form").addEventListener("submit", doTrace);
  $("regen-btn").addEventListener("click", regenerate);
  $("rows-form").addEventListener("submit", browseRows);
  $("edit-form").addEventListener("submit", previewEdit);
  $("edit-confirm").addEventListener("click", confirmEdit);
  $("edit-cancel").addEventListener("click", () => { $("edit-plan").hidden = true; });
  $("edit-action").addEventListener("change", () => { $("factor-label").hidden = $("edit-action").value !== "scale"; });
  $("edit-layer").addEventListener("change", fitEditActions);
  renderChatPacks();
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-reset").addEventListener("click", resetChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  fitEditActions();
  renderOffList();
  await Promise.all([doTrace(), browseRows()]);
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", () => { init().catch((e) => showError(String(e.message || e))); });
