// The chat page of vlm serve. It talks only to the server's own API (/v1/models, /v1/chat/completions with
// streaming) from the same origin, keeps conversations in this browser's local storage, and sends images as data
// URLs. No third-party code: markdown.js renders answers with all text escaped.
"use strict";

const STORE_KEY = "vlm-chat.conversations";
const CURRENT_KEY = "vlm-chat.current";
const MODEL_KEY = "vlm-chat.model";
const PARAMS_KEY = "vlm-chat.params";
const API_KEY_KEY = "vlm-chat.api-key"; // session storage: gone when the tab closes
const NUMBER_PARAMS = ["temperature", "top_p", "top_k", "max_tokens", "seed"];
const FLAG_PARAMS = ["enable_thinking", "ignore_eos"];

const $ = (id) => document.getElementById(id);
const state = { conversations: [], currentId: null, pending: [], controller: null };

// ---- storage ----

function loadStore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "[]");
    state.conversations = Array.isArray(saved) ? saved.filter((c) => c && Array.isArray(c.messages)) : [];
  } catch {
    state.conversations = [];
  }
  state.currentId = localStorage.getItem(CURRENT_KEY);
  if (!state.conversations.some((c) => c.id === state.currentId)) state.currentId = null;
}

function saveStore() {
  // Images make conversations large: when the browser's quota is reached, the oldest other conversations go.
  for (;;) {
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations));
      if (state.currentId) localStorage.setItem(CURRENT_KEY, state.currentId);
      return;
    } catch (e) {
      const others = state.conversations.filter((c) => c.id !== state.currentId);
      if (!others.length) {
        setStatus("this conversation is too large for the browser's storage; it is kept until you reload");
        return;
      }
      const oldest = others.reduce((a, b) => (a.updated <= b.updated ? a : b));
      state.conversations = state.conversations.filter((c) => c !== oldest);
    }
  }
}

function current() {
  let conv = state.conversations.find((c) => c.id === state.currentId);
  if (!conv) {
    conv = { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`, title: "New chat", messages: [], updated: Date.now() };
    state.conversations.push(conv);
    state.currentId = conv.id;
  }
  return conv;
}

// ---- API ----

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(API_KEY_KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: apiHeaders() });
  if (response.status === 401) return askForKey();
  if (!response.ok) return setStatus(`could not list models: ${await errorMessage(response)}`);
  const models = (await response.json()).data.map((m) => m.id);
  const select = $("model");
  select.replaceChildren(...models.map((id) => new Option(id, id)));
  const remembered = localStorage.getItem(MODEL_KEY);
  if (models.includes(remembered)) select.value = remembered;
  setStatus(models.length ? "" : "the server lists no models");
}

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
  setStatus("an API key is needed");
}

function readParams() {
  const params = {};
  for (const name of NUMBER_PARAMS) {
    const value = $(`p-${name}`).value;
    if (value !== "") params[name] = Number(value);
  }
  for (const name of FLAG_PARAMS) if ($(`p-${name}`).checked) params[name] = true;
  return params;
}

function apiMessages(conv) {
  const messages = [];
  const system = $("p-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conv.messages) {
    if (m.role === "user") {
      const parts = (m.images || []).map((url) => ({ type: "image_url", image_url: { url } }));
      parts.push({ type: "text", text: m.content });
      messages.push({ role: "user", content: parts });
    } else if (!m.error) {
      messages.push({ role: "assistant", content: m.content });
    }
  }
  return messages;
}

// Server-sent events from a fetch body: yields each event's parsed data until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send() {
  const text = $("input").value.trim();
  if (state.controller || (!text && !state.pending.length)) return;
  const conv = current();
  if (!conv.messages.length) conv.title = (text || "image").slice(0, 40);
  conv.messages.push({ role: "user", content: text, images: state.pending });
  state.pending = [];
  renderAttachments();
  $("input").value = "";
  const answer = { role: "assistant", content: "", reasoning: "" };
  conv.messages.push(answer);
  conv.updated = Date.now();
  localStorage.setItem(MODEL_KEY, $("model").value);
  saveStore();
  renderAll();
  const element = $("messages").lastElementChild;
  const body = { model: $("model").value, messages: apiMessages({ messages: conv.messages.slice(0, -1) }), stream: true, ...readParams() };
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: apiHeaders(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (response.status === 401) askForKey();
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      answer.content += choice.delta.content || "";
      answer.reasoning += choice.delta.reasoning_content || "";
      if (choice.finish_reason) answer.finish = choice.finish_reason;
      const box = $("messages");
      const following = box.scrollHeight - box.scrollTop - box.clientHeight < 40; // the reader is at the end
      renderMessage(element, answer);
      if (following) box.scrollTop = box.scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") answer.stopped = true;
    else answer.error = e.message;
  } finally {
    state.controller = null;
    setBusy(false);
    conv.updated = Date.now();
    saveStore();
    renderMessage(element, answer);
    renderSidebar();
  }
}

// ---- rendering ----

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  setStatus(busy ? "generating..." : "");
}

function renderMessage(element, m) {
  element.className = `message ${m.role}`;
  const parts = [`<div class="role">${m.role === "user" ? "You" : "Assistant"}</div>`];
  for (const url of m.images || []) parts.push(`<img alt="attached image" src="${escapeHtml(url)}">`);
  if (m.reasoning) parts.push(`<div class="reasoning">${escapeHtml(m.reasoning)}</div>`);
  if (m.role === "user") parts.push(`<div class="content">${escapeHtml(m.content).replace(/\n/g, "<br>")}</div>`);
  else parts.push(`<div class="content">${renderMarkdown(m.content)}</div>`);
  if (m.stopped) parts.push('<div class="note">stopped</div>');
  if (m.finish === "length") parts.push('<div class="note">cut at max tokens</div>');
  if (m.error) parts.push(`<div class="error">${escapeHtml(m.error)}</div>`);
  element.innerHTML = parts.join("");
}

function renderAll() {
  const conv = state.conversations.find((c) => c.id === state.currentId);
  const container = $("messages");
  container.replaceChildren();
  for (const m of conv ? conv.messages : []) {
    const element = document.createElement("div");
    renderMessage(element, m);
    container.appendChild(element);
  }
  container.scrollTop = container.scrollHeight;
  renderSidebar();
}

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of [...state.conversations].sort((a, b) => b.updated - a.updated)) {
    const item = document.createElement("li");
    if (conv.id === state.currentId) item.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conv.title;
    open.onclick = () => {
      if (state.controller) return;
      state.currentId = conv.id;
      saveStore();
      renderAll();
    };
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Delete this conversation";
    remove.onclick = () => {
      if (state.controller && conv.id === state.currentId) return;
      state.conversations = state.conversations.filter((c) => c !== conv);
      if (conv.id === state.currentId) state.currentId = null;
      localStorage.removeItem(CURRENT_KEY);
      saveStore();
      renderAll();
    };
    item.append(open, remove);
    list.appendChild(item);
  }
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.pending.forEach((url, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image to send";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.onclick = () => {
      state.pending.splice(i, 1);
      renderAttachments();
    };
    figure.append(img, remove);
    box.appendChild(figure);
  });
}

// ---- images: the file picker, paste and drag-and-drop ----

function addImages(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => {
      state.pending.push(reader.result);
      renderAttachments();
    };
    reader.readAsDataURL(file);
  }
}

function wireImages() {
  $("file").addEventListener("change", (e) => {
    addImages(e.target.files);
    e.target.value = "";
  });
  $("input").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.items : [])].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.length) {
      e.preventDefault();
      addImages(files);
    }
  });
  const composer = $("composer");
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    composer.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => composer.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    composer.classList.remove("dragging");
    addImages(e.dataTransfer.files);
  });
}

// ---- start ----

function wireParams() {
  const saved = JSON.parse(localStorage.getItem(PARAMS_KEY) || "{}");
  for (const name of NUMBER_PARAMS) if (name in saved) $(`p-${name}`).value = saved[name];
  for (const name of FLAG_PARAMS) $(`p-${name}`).checked = Boolean(saved[name]);
  if (typeof saved.system === "string") $("p-system").value = saved.system;
  $("params").addEventListener("input", () => {
    localStorage.setItem(PARAMS_KEY, JSON.stringify({ ...readParams(), system: $("p-system").value }));
  });
  $("params").addEventListener("submit", (e) => e.preventDefault());
  $("toggle-params").addEventListener("click", () => {
    const form = $("params");
    form.hidden = !form.hidden;
    $("toggle-params").setAttribute("aria-expanded", String(!form.hidden));
  });
}

function start() {
  loadStore();
  wireParams();
  wireImages();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) return;
    state.currentId = null;
    localStorage.removeItem(CURRENT_KEY);
    renderAll();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(API_KEY_KEY, $("api-key").value.trim());
    $("key-form").hidden = true;
    loadModels();
  });
  renderAll();
  if (document.body.dataset.keyRequired === "true" && !sessionStorage.getItem(API_KEY_KEY)) askForKey();
  else loadModels();
}

document.addEventListener("DOMContentLoaded", start);
