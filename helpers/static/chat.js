// The chat page of helpers.server (GET /): plain JavaScript, no build step, nothing from the internet.
// It talks to the same server: GET /health (model family), GET /v1/models (model id) and
// POST /v1/chat/completions with "stream": true, read as server-sent events ("data: ..." lines,
// ending with "data: [DONE]"). Stop aborts the fetch; the server then cancels the generation.
"use strict";

const TEXT = {
  zh: {
    title: "大模型对话", send: "发送", stop: "停止", clear: "新对话", settings: "设置",
    temperature: "温度 (temperature)", maxTokens: "最多生成的 token 数 (max_tokens)",
    system: "系统提示词 (system)", systemPlaceholder: "例如：你是一位耐心的助教。",
    noSystem: "这个模型没有 system 角色，不能设置系统提示词。",
    apiKey: "API 密钥", apiKeyPlaceholder: "服务器要求时才需要",
    apiKeyHint: "密钥只保存在本浏览器 (localStorage)，以 Authorization: Bearer 发送。",
    placeholder: "输入问题，Enter 发送，Shift+Enter 换行", lang: "English",
    ready: "服务器在线", down: "连不上服务器：它是不是停了？请检查服务器是否在运行、地址和端口是否正确。",
    downShort: "服务器离线", notReadyShort: "暂不能生成",
    loading: (s) => `模型还在加载，${s} 秒后自动再试。`,
    notReady: (status, reason) => `服务器现在不能生成（${status}）：${reason}`,
    busy: (s) => `服务器正忙（排队已满），请 ${s} 秒后再试。`,
    key: (m) => `API 密钥无效或缺失：请在右侧“API 密钥”中填写老师给的密钥。（${m}）`,
    error: (status, m) => `服务器返回错误 ${status}：${m}`,
    streamError: (m) => `生成中出错：${m}`,
    stopped: "已停止", finish: { stop: "完成", length: "达到 max_tokens 上限" },
    usage: (u) => `提示 ${u.prompt_tokens} + 回答 ${u.completion_tokens} = ${u.total_tokens} tokens`,
  },
  en: {
    title: "LLM chat", send: "Send", stop: "Stop", clear: "New chat", settings: "Settings",
    temperature: "Temperature", maxTokens: "Max tokens (max_tokens)",
    system: "System prompt", systemPlaceholder: "e.g. You are a patient teaching assistant.",
    noSystem: "This model has no system role: no system prompt can be set.",
    apiKey: "API key", apiKeyPlaceholder: "only if the server asks for one",
    apiKeyHint: "Kept in this browser only (localStorage), sent as Authorization: Bearer.",
    placeholder: "Ask something; Enter sends, Shift+Enter adds a line", lang: "中文",
    ready: "server online", down: "Cannot reach the server: is it stopped? Check that it is running and the address and port are right.",
    downShort: "server offline", notReadyShort: "cannot generate now",
    loading: (s) => `The model is still loading: trying again in ${s} s.`,
    notReady: (status, reason) => `The server cannot generate now (${status}): ${reason}`,
    busy: (s) => `The server is busy (its queue is full): try again in ${s} s.`,
    key: (m) => `The API key is missing or not valid: enter the key you were given under "API key". (${m})`,
    error: (status, m) => `The server answered ${status}: ${m}`,
    streamError: (m) => `Error while generating: ${m}`,
    stopped: "stopped", finish: { stop: "done", length: "reached max_tokens" },
    usage: (u) => `prompt ${u.prompt_tokens} + answer ${u.completion_tokens} = ${u.total_tokens} tokens`,
  },
};
const NO_SYSTEM_ROLE = ["xverse"];  // families whose chat format has no system role

const $ = (id) => document.getElementById(id);
const store = window.localStorage;
const state = { lang: store.getItem("chat.lang") || "zh", model: null, family: null, messages: [], controller: null };
const t = (key) => TEXT[state.lang][key];

function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = t("lang");
  document.title = t("title");
  if (state.notice) showNotice(...state.notice);
  refreshStatus();
}

function showNotice(kind, make, ...args) {
  state.notice = [kind, make, ...args];
  const box = $("notice");
  const text = t(make);
  box.textContent = typeof text === "function" ? text(...args) : text;
  box.className = "notice " + kind;
  box.dataset.kind = kind;
  box.hidden = false;
}

function hideNotice() { state.notice = null; $("notice").hidden = true; $("notice").dataset.kind = ""; }

function refreshStatus() {
  const el = $("server-status");
  if (state.online === undefined) return;
  el.textContent = state.online ? t("ready") : t(state.reachable ? "notReadyShort" : "downShort");
  el.classList.toggle("down", !state.online);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// An error reply: 429 busy (with Retry-After), 401 key, any other: the server's own message.
async function reportHttpError(response) {
  let message = response.statusText || String(response.status);
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON */ }
  if (response.status === 429) showNotice("busy", "busy", response.headers.get("Retry-After") || "5");
  else if (response.status === 401) showNotice("key", "key", message);
  else showNotice("error", "error", response.status, message);
}

function unreachable() {
  state.online = false;
  state.reachable = false;
  refreshStatus();
  showNotice("down", "down");
}

async function loadServerInfo() {
  try {
    // /health is 200 only when the server can generate; 503 says why (loading, failed, stopping)
    const response = await fetch("/health");
    const health = await response.json();
    state.reachable = true;
    if (!response.ok) {
      state.online = false;
      refreshStatus();
      if (health.status === "loading") {
        const retry = parseInt(response.headers.get("Retry-After") || "5", 10);
        showNotice("loading", "loading", retry);
        setTimeout(loadServerInfo, retry * 1000);
      } else showNotice("error", "notReady", health.status, health.reason || "");
      return;
    }
    if (state.notice && state.notice[0] === "loading") hideNotice();
    state.family = health.family;
    state.online = true;
    const noSystem = NO_SYSTEM_ROLE.includes(health.family);
    $("system-box").hidden = noSystem;
    $("system").disabled = noSystem;
    $("no-system").hidden = !noSystem;
    $("model").textContent = health.model;
    refreshStatus();
  } catch (e) {
    unreachable();
    return;
  }
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) { await reportHttpError(response); return; }
    const models = await response.json();
    state.model = models.data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    unreachable();
  }
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  box.appendChild(content);
  $("messages").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function setMeta(box, text) {
  let meta = box.querySelector(".meta");
  if (!meta) { meta = document.createElement("span"); meta.className = "meta"; box.appendChild(meta); }
  meta.textContent = text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("clear").disabled = busy;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system && !NO_SYSTEM_ROLE.includes(state.family)) messages.push({ role: "system", content: system });
  messages.push(...state.messages);
  const body = { model: state.model || "default", messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  // for experiments and tests: window.chatExtraBody = {ignore_eos: true} is merged into the request
  return Object.assign(body, window.chatExtraBody || {});
}

async function send(question) {
  hideNotice();
  if (!state.model) await loadServerInfo();
  if (!state.model) return;
  state.messages.push({ role: "user", content: question });
  const userBox = addMessage("user", question);
  const box = addMessage("assistant", "");
  const content = box.querySelector(".content");
  box.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let answer = "";
  let finish = null;
  let usage = null;
  let failed = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      failed = true;
      await reportHttpError(response);
    } else {
      state.online = true;
      refreshStatus();
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const event = JSON.parse(data);
          if (event.error) { failed = true; showNotice("error", "streamError", event.error.message); continue; }
          if (event.usage) usage = event.usage;
          const choice = event.choices && event.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            content.textContent = answer;
            box.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { failed = true; unreachable(); }
  } finally {
    state.controller = null;
    box.classList.remove("streaming");
    setBusy(false);
  }
  if (answer || !failed) state.messages.push({ role: "assistant", content: answer });
  else {  // nothing came back: the question goes back into the input, to be sent again
    state.messages.pop();
    box.remove();
    userBox.remove();
    if (!$("input").value) $("input").value = question;
  }
  const parts = [];
  if (finish === "stopped") parts.push(t("stopped"));
  else if (finish) parts.push(t("finish")[finish] || finish);
  if (usage) parts.push(t("usage")(usage));
  if (parts.length && box.isConnected) { setMeta(box, parts.join(" · ")); box.dataset.finish = finish || ""; }
}

function submit(event) {
  if (event) event.preventDefault();
  const question = $("input").value.trim();
  if (!question || state.controller) return;
  $("input").value = "";
  send(question);
}

function restoreSettings() {
  for (const [id, key] of [["temperature", "chat.temperature"], ["max-tokens", "chat.maxTokens"],
                           ["system", "chat.system"], ["api-key", "chat.apiKey"]]) {
    const saved = store.getItem(key);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => store.setItem(key, $(id).value.trim()));
  }
  $("api-key").addEventListener("change", () => { hideNotice(); loadServerInfo(); });
}

$("composer").addEventListener("submit", submit);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) submit(e);
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("clear").addEventListener("click", () => { state.messages = []; $("messages").textContent = ""; hideNotice(); });
$("lang").addEventListener("click", () => {
  state.lang = state.lang === "zh" ? "en" : "zh";
  store.setItem("chat.lang", state.lang);
  applyLanguage();
});
restoreSettings();
applyLanguage();
loadServerInfo();
