// The edge-qwen chat page: conversations in localStorage, answers streamed from
// POST /v1/chat/completions (server-sent events), rendered as Markdown (marked), sanitized
// (DOMPurify) and highlighted (highlight.js). Everything it loads or calls is on this origin.
"use strict";

(function () {
  const STORE_KEY = "edge-qwen.conversations.v1";
  const CURRENT_KEY = "edge-qwen.current";
  const API_KEY = "edge-qwen.api-key"; // sessionStorage: asked once per tab, gone when it closes
  const DEFAULT_SCHEMA = JSON.stringify({
    type: "object",
    properties: { name: { type: "string" }, age: { type: "integer" }, city: { type: "string" } },
    required: ["name", "age", "city"],
    additionalProperties: false,
  }, null, 2);
  const DEFAULT_SETTINGS = { system: "", temperature: 0.7, top_p: 0.9, max_tokens: 512, model: "",
                             json_mode: false, schema: DEFAULT_SCHEMA };

  const lang = window.edgeQwenLanguage();
  const words = window.EDGE_QWEN_STRINGS[lang];
  const t = (key, ...args) => (typeof words[key] === "function" ? words[key](...args) : words[key]);
  const $ = (id) => document.getElementById(id);

  const el = {
    messages: $("messages"), prompt: $("prompt"), composer: $("composer"), send: $("send"), stop: $("stop"),
    status: $("status"), list: $("conversations"), sidebar: $("sidebar"), toggleList: $("toggle-list"),
    newChat: $("new-chat"), openSettings: $("open-settings"), settings: $("settings"),
    settingsForm: $("settings-form"), system: $("system"), temperature: $("temperature"), top_p: $("top_p"),
    max_tokens: $("max_tokens"), jsonMode: $("json-mode"), schema: $("schema"), schemaError: $("schema-error"),
    jsonBadge: $("json-badge"), modelPick: $("model-pick"), model: $("model"), keyDialog: $("key-dialog"),
    keyForm: $("key-form"), keyInput: $("api-key"), keyError: $("key-error"),
    mcpPanel: $("mcp-panel"), mcpUse: $("mcp-use"), mcpTools: $("mcp-tools"),
  };

  // --- words on the page ---------------------------------------------------------------------
  function applyLanguage() {
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const node of document.querySelectorAll("[data-i18n-placeholder]")) node.placeholder = t(node.dataset.i18nPlaceholder);
    for (const node of document.querySelectorAll("[data-i18n-label]")) {
      node.setAttribute("aria-label", t(node.dataset.i18nLabel));
      node.title = t(node.dataset.i18nLabel);
    }
  }

  // --- conversations in localStorage ----------------------------------------------------------
  let store = { conversations: {} };
  let currentId = null;

  function loadStore() {
    try {
      const raw = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
      if (raw && typeof raw.conversations === "object") store = raw;
    } catch (e) { /* a damaged entry: start afresh rather than fail to open the page */ }
    currentId = localStorage.getItem(CURRENT_KEY);
    if (!currentId || !store.conversations[currentId]) currentId = newConversation().id;
  }

  function saveStore() {
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(store));
      localStorage.setItem(CURRENT_KEY, currentId);
    } catch (e) {
      setStatus(String(e), true); // quota full: say so instead of losing turns silently
    }
  }

  function newConversation(settings) {
    const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
    const base = settings || (current() ? current().settings : DEFAULT_SETTINGS);
    const conv = { id, title: "", created: Date.now(), updated: Date.now(), settings: { ...DEFAULT_SETTINGS, ...base },
                   messages: [] };
    store.conversations[id] = conv;
    currentId = id;
    return conv;
  }

  function current() { return store.conversations[currentId] || null; }

  // --- rendering ------------------------------------------------------------------------------
  const PURIFY = { FORBID_TAGS: ["style", "img", "form", "input", "textarea", "select", "button"],
                   FORBID_ATTR: ["style"] };

  function markdown(node, text) {
    node.innerHTML = window.DOMPurify.sanitize(window.marked.parse(text, { gfm: true, breaks: false }), PURIFY);
    for (const a of node.querySelectorAll("a[href]")) { a.rel = "noopener noreferrer"; a.target = "_blank"; }
    for (const code of node.querySelectorAll("pre code")) {
      const known = [...code.classList].some((c) => c.startsWith("language-") && window.hljs.getLanguage(c.slice(9)));
      if (!known) code.classList.add("language-plaintext"); // an unknown fence: plain, not a console warning
      window.hljs.highlightElement(code);
    }
  }

  function jsonResult(node, msg) {
    node.textContent = "";
    const box = document.createElement("div");
    box.className = "json-result";
    const note = document.createElement("p");
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.className = "language-json";
    let value;
    try { value = JSON.parse(msg.content); } catch (e) { value = undefined; }
    if (value !== undefined && msg.meta.finish === "stop") {
      note.className = "ok";
      note.textContent = "✓ " + t("schemaValid");
      code.textContent = JSON.stringify(value, null, 2);
      box.dataset.valid = "true";
    } else {
      note.className = "error";
      note.textContent = msg.meta.finish === "stopped" ? t("stopped") : t("schemaCut");
      code.textContent = msg.content;
      box.dataset.valid = "false";
    }
    pre.appendChild(code);
    box.append(note, pre);
    node.appendChild(box);
    window.hljs.highlightElement(code);
  }

  function fillBody(node, msg) {
    if (msg.role === "user") { node.textContent = msg.content; return; }
    if (msg.meta && msg.meta.json && msg.meta.finish && msg.meta.finish !== "error") { jsonResult(node, msg); }
    else markdown(node, msg.content);
    if (msg.meta && msg.meta.error) {
      const p = document.createElement("p");
      p.className = "error";
      p.setAttribute("role", "alert");
      p.textContent = msg.meta.error;
      node.appendChild(p);
    }
    const note = msg.meta && (msg.meta.finish === "stopped" ? t("stopped") : msg.meta.finish === "length" ? t("cutShort") : "");
    if (note && !(msg.meta.json)) {
      const p = document.createElement("p");
      p.className = "note";
      p.textContent = note;
      node.appendChild(p);
    }
  }

  // The MCP tool loop's calls (serve --mcp): each call, its arguments and its result, as text only --
  // a tool result is data, never markup.
  function renderCalls(box, msg) {
    box.textContent = "";
    for (const call of (msg.meta && msg.meta.calls) || []) {
      const d = document.createElement("details");
      d.className = "mcp-call";
      d.dataset.name = call.name;
      d.dataset.state = call.done ? (call.is_error ? "error" : "done") : "running";
      d.open = true;
      const summary = document.createElement("summary");
      summary.textContent = `${t("mcpCall")}: ${call.server}.${call.name}`;
      const args = document.createElement("pre");
      args.className = "mcp-args";
      args.textContent = JSON.stringify(call.arguments);
      const out = document.createElement("pre");
      out.className = "mcp-output" + (call.is_error ? " error" : "");
      out.textContent = call.done ? `${call.is_error ? t("mcpFailed") : t("mcpResult")}: ${call.output}` : t("mcpRunning");
      d.append(summary, args, out);
      if (call.confirm && !call.answered && !call.done) {
        const ask = document.createElement("div");
        ask.className = "ask";
        const q = document.createElement("span");
        q.textContent = t("mcpAsk");
        const answer = (allow) => {
          call.answered = true;
          api("/v1/mcp/confirm", { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify({ id: call.id, allow }) });
          renderCalls(box, msg);
        };
        ask.append(q, button("mcpAllow", () => answer(true), "small primary"), button("mcpDecline", () => answer(false)));
        d.appendChild(ask);
      }
      box.appendChild(d);
    }
  }

  function button(label, onClick, cls) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = t(label);
    b.className = cls || "small";
    b.dataset.action = label;
    b.addEventListener("click", onClick);
    return b;
  }

  function messageNode(conv, msg, index) {
    const art = document.createElement("article");
    art.className = "msg " + msg.role;
    art.dataset.index = String(index);
    const who = document.createElement("h3");
    who.className = "who";
    who.textContent = msg.role === "user" ? t("you") : t("assistant");
    const calls = document.createElement("div");
    calls.className = "mcp-calls";
    if (msg.role === "assistant") renderCalls(calls, msg);
    const body = document.createElement("div");
    body.className = "content";
    fillBody(body, msg);
    const tools = document.createElement("div");
    tools.className = "tools";
    const last = index === conv.messages.length - 1;
    if (!busy) {
      if (msg.role === "user") tools.appendChild(button("edit", () => startEdit(conv, index, art)));
      if (msg.role === "assistant") {
        tools.appendChild(button("copy", (e) => copy(msg.content, e.target)));
        if (last) tools.appendChild(button("regenerate", () => regenerate(conv)));
      }
    }
    art.append(who, calls, body, tools);
    return art;
  }

  function renderMessages() {
    const conv = current();
    el.messages.textContent = "";
    if (!conv.messages.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = t("empty");
      el.messages.appendChild(p);
    }
    conv.messages.forEach((msg, i) => el.messages.appendChild(messageNode(conv, msg, i)));
    el.messages.scrollTop = el.messages.scrollHeight;
    el.jsonBadge.hidden = !conv.settings.json_mode;
  }

  function renderList() {
    el.list.textContent = "";
    const convs = Object.values(store.conversations).sort((a, b) => b.updated - a.updated);
    for (const conv of convs) {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open-conv";
      open.textContent = conv.title || t("untitled");
      if (conv.id === currentId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => { switchTo(conv.id); closeListOnPhone(); });
      const del = document.createElement("button");
      del.type = "button";
      del.className = "icon delete";
      del.textContent = "×";
      del.setAttribute("aria-label", t("remove") + ": " + (conv.title || t("untitled")));
      del.title = t("remove");
      del.addEventListener("click", () => removeConversation(conv.id));
      li.append(open, del);
      el.list.appendChild(li);
    }
  }

  function render() { renderList(); renderMessages(); }

  function setStatus(text, isError) {
    el.status.textContent = text || "";
    el.status.classList.toggle("error", !!isError);
  }

  function switchTo(id) {
    currentId = id;
    saveStore();
    render();
    applyModelChoice();
  }

  function removeConversation(id) {
    if (busy && generating && generating.conv.id === id) stop();
    delete store.conversations[id];
    if (id === currentId) {
      const rest = Object.values(store.conversations).sort((a, b) => b.updated - a.updated);
      if (rest.length) currentId = rest[0].id; else newConversation(DEFAULT_SETTINGS);
    }
    saveStore();
    render();
  }

  function copy(text, target) {
    if (!navigator.clipboard) return;
    navigator.clipboard.writeText(text).then(() => { target.textContent = t("copied"); }, () => {});
  }

  // --- the API --------------------------------------------------------------------------------
  let apiKey = sessionStorage.getItem(API_KEY) || "";
  let keyPrompt = null;

  function askKey(wrong) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      el.keyError.textContent = wrong ? t("keyWrong") : "";
      el.keyInput.value = "";
      const done = () => {
        const value = el.keyInput.value.trim();
        if (!value) { el.keyDialog.showModal(); return; } // no way to work without it: ask again
        el.keyDialog.removeEventListener("close", done);
        apiKey = value;
        sessionStorage.setItem(API_KEY, value);
        keyPrompt = null;
        resolve(value);
      };
      el.keyDialog.addEventListener("close", done);
      el.keyDialog.showModal();
      el.keyInput.focus();
    });
    return keyPrompt;
  }

  async function api(path, options) {
    for (;;) {
      const headers = { ...(options && options.headers) };
      if (apiKey) headers.Authorization = "Bearer " + apiKey;
      const response = await fetch(path, { ...options, headers });
      if (response.status !== 401) return response;
      const hadKey = !!apiKey;
      apiKey = "";
      sessionStorage.removeItem(API_KEY);
      await askKey(hadKey);
    }
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON: fall through */ }
    return `HTTP ${response.status}`;
  }

  let served = [];

  async function loadModels() {
    try {
      const response = await api("/v1/models");
      if (!response.ok) { setStatus(await errorText(response), true); return; }
      served = (await response.json()).data.map((m) => m.id);
    } catch (e) {
      setStatus(t("serverDown") + e.message, true);
      return;
    }
    el.model.textContent = "";
    for (const id of served) {
      const option = document.createElement("option");
      option.value = id;
      option.textContent = id;
      el.model.appendChild(option);
    }
    el.modelPick.hidden = served.length < 2;
    applyModelChoice();
  }

  let mcpServers = [];

  async function loadMcp() {
    let listed;
    try {
      const response = await api("/v1/mcp/tools");
      if (!response.ok) return; // an older server, or MCP not allowed here: no panel
      listed = (await response.json()).servers || {};
    } catch (e) { return; }
    mcpServers = Object.keys(listed);
    el.mcpTools.textContent = "";
    for (const [server, info] of Object.entries(listed)) {
      for (const tool of info.tools) {
        const li = document.createElement("li");
        const code = document.createElement("code");
        code.textContent = `${server}.${tool.name}`;
        li.append(code, document.createTextNode(tool.description ? " — " + tool.description : ""));
        el.mcpTools.appendChild(li);
      }
    }
    el.mcpPanel.hidden = mcpServers.length === 0;
  }

  function applyModelChoice() {
    const conv = current();
    if (!served.length) return;
    if (!served.includes(conv.settings.model)) conv.settings.model = served[0];
    el.model.value = conv.settings.model;
  }

  // --- generation -----------------------------------------------------------------------------
  let busy = false;
  let generating = null; // {conv, controller}

  function setBusy(on) {
    busy = on;
    el.send.hidden = on;
    el.stop.hidden = !on;
    el.messages.setAttribute("aria-busy", on ? "true" : "false");
  }

  function requestBody(conv) {
    const s = conv.settings;
    const messages = [];
    if (s.system.trim()) messages.push({ role: "system", content: s.system });
    for (const m of conv.messages.slice(0, -1)) messages.push({ role: m.role, content: m.content });
    const body = { messages, stream: true, temperature: Number(s.temperature), top_p: Number(s.top_p),
                   max_tokens: Number(s.max_tokens) };
    if (s.model) body.model = s.model;
    if (mcpServers.length && el.mcpUse.checked) body.mcp_servers = mcpServers;
    if (s.json_mode) {
      body.response_format = { type: "json_schema",
                               json_schema: { name: "answer", schema: JSON.parse(s.schema), strict: true } };
    }
    return body;
  }

  async function generate(conv) {
    const msg = { role: "assistant", content: "", meta: { json: !!conv.settings.json_mode } };
    conv.messages.push(msg);
    conv.updated = Date.now();
    const controller = new AbortController();
    generating = { conv, controller };
    setBusy(true);
    setStatus(t("generating"));
    saveStore();
    render();
    const started = performance.now();
    let body;
    try {
      body = requestBody(conv);
    } catch (e) {
      msg.meta.finish = "error";
      msg.meta.error = t("schemaBad") + e.message;
      return finish(conv, msg, started);
    }
    let node = null;
    let drawn = false;
    let streaming = true; // a frame queued by the last chunk must not overwrite finish()'s rendering
    const draw = () => {
      drawn = false;
      if (!streaming || currentId !== conv.id) return;
      if (!node || !node.isConnected) {
        const art = el.messages.querySelector(`article[data-index="${conv.messages.length - 1}"] .content`);
        node = art;
      }
      if (!node) return;
      if (msg.meta.json) node.textContent = msg.content; // raw while it streams; the object once it is done
      else markdown(node, msg.content);
      const calls = node.parentNode && node.parentNode.querySelector(".mcp-calls");
      if (calls && msg.meta.calls && calls.dataset.version !== String(msg.meta.callsVersion)) {
        calls.dataset.version = String(msg.meta.callsVersion); // only when a call changed: a click must land
        renderCalls(calls, msg);
      }
      el.messages.scrollTop = el.messages.scrollHeight;
    };
    let lastSave = 0;
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder("utf-8");
      let buffer = "";
      let ended = false;
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { ended = true; break; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message || "error");
            const choice = chunk.choices && chunk.choices[0];
            if (choice && choice.delta && choice.delta.content) msg.content += choice.delta.content;
            if (choice && choice.delta && choice.delta.mcp_call) {
              msg.meta.calls = msg.meta.calls || [];
              msg.meta.calls.push({ ...choice.delta.mcp_call });
              msg.meta.callsVersion = (msg.meta.callsVersion || 0) + 1;
            }
            if (choice && choice.delta && choice.delta.mcp_result) {
              const r = choice.delta.mcp_result;
              const call = (msg.meta.calls || []).find((c) => c.id === r.id);
              if (call) Object.assign(call, { output: r.output, is_error: r.is_error, done: true });
              msg.meta.callsVersion = (msg.meta.callsVersion || 0) + 1;
            }
            if (choice && choice.finish_reason) msg.meta.finish = choice.finish_reason;
            if (chunk.usage) msg.meta.usage = chunk.usage;
          }
        }
        if (!drawn) { drawn = true; requestAnimationFrame(draw); }
        if (performance.now() - lastSave > 1000) { lastSave = performance.now(); saveStore(); }
      }
    } catch (e) {
      if (e.name === "AbortError") msg.meta.finish = "stopped";
      else { msg.meta.finish = "error"; msg.meta.error = e.message; }
    }
    streaming = false;
    return finish(conv, msg, started);
  }

  function finish(conv, msg, started) {
    if (!msg.meta.finish) msg.meta.finish = "stopped";
    msg.meta.seconds = Math.round((performance.now() - started) / 100) / 10;
    generating = null;
    setBusy(false);
    conv.updated = Date.now();
    saveStore();
    render();
    const usage = msg.meta.usage;
    if (msg.meta.error) setStatus(msg.meta.error, true);
    else setStatus(usage ? t("tokens", usage.completion_tokens, msg.meta.seconds) : "");
    el.prompt.focus();
  }

  function stop() {
    if (generating) generating.controller.abort();
  }

  function send() {
    const text = el.prompt.value.replace(/\s+$/, ""); // a trailing line break is never meant
    if (busy || !text.trim()) return;
    const conv = current();
    conv.messages.push({ role: "user", content: text });
    if (!conv.title) conv.title = text.trim().replace(/\s+/g, " ").slice(0, 48);
    el.prompt.value = "";
    generate(conv);
  }

  function regenerate(conv) {
    if (busy) return;
    if (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
    generate(conv);
  }

  function startEdit(conv, index, art) {
    if (busy) return;
    const body = art.querySelector(".content");
    const tools = art.querySelector(".tools");
    const area = document.createElement("textarea");
    area.className = "edit-box";
    area.value = conv.messages[index].content;
    area.rows = Math.min(10, area.value.split("\n").length + 1);
    area.setAttribute("aria-label", t("edit"));
    body.replaceChildren(area);
    const save = () => {
      if (!area.value.trim()) return;
      conv.messages = conv.messages.slice(0, index);
      conv.messages.push({ role: "user", content: area.value });
      if (index === 0) conv.title = area.value.trim().replace(/\s+/g, " ").slice(0, 48);
      generate(conv);
    };
    tools.replaceChildren(button("save", save, "small primary"), button("cancel", () => renderMessages()));
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !composing(e)) { e.preventDefault(); save(); }
      if (e.key === "Escape") { e.preventDefault(); renderMessages(); }
    });
    area.focus();
  }

  // --- input ----------------------------------------------------------------------------------
  // Enter while an input method is composing (Chinese pinyin, Japanese) picks a candidate; it
  // must not send. Chrome marks such keydowns isComposing; Safari sends keyCode 229 instead.
  let imeActive = false;
  const composing = (e) => e.isComposing || e.keyCode === 229 || imeActive;
  document.addEventListener("compositionstart", () => { imeActive = true; });
  document.addEventListener("compositionend", () => { setTimeout(() => { imeActive = false; }, 0); });

  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !composing(e)) { e.preventDefault(); send(); }
  });
  el.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  el.stop.addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && busy && !el.settings.open && !el.keyDialog.open) { e.preventDefault(); stop(); }
  });
  el.newChat.addEventListener("click", () => {
    const conv = current();
    if (conv && !conv.messages.length) { el.prompt.focus(); return; } // already an empty one
    newConversation();
    saveStore();
    render();
    applyModelChoice();
    el.prompt.focus();
  });
  el.model.addEventListener("change", () => { current().settings.model = el.model.value; saveStore(); });

  function closeListOnPhone() {
    if (window.matchMedia("(max-width: 760px)").matches) {
      el.sidebar.classList.remove("open");
      el.toggleList.setAttribute("aria-expanded", "false");
    }
  }
  el.toggleList.addEventListener("click", () => {
    const open = el.sidebar.classList.toggle("open");
    el.toggleList.setAttribute("aria-expanded", open ? "true" : "false");
    if (open) { const first = el.list.querySelector("button"); if (first) first.focus(); }
  });

  // --- settings -------------------------------------------------------------------------------
  el.openSettings.addEventListener("click", () => {
    const s = current().settings;
    el.system.value = s.system;
    el.temperature.value = s.temperature;
    el.top_p.value = s.top_p;
    el.max_tokens.value = s.max_tokens;
    el.jsonMode.checked = !!s.json_mode;
    el.schema.value = s.schema;
    el.schemaError.textContent = "";
    el.settings.showModal();
    el.system.focus();
  });

  function readSettings() {
    const s = current().settings;
    const num = (input, fallback) => (input.value === "" || Number.isNaN(Number(input.value)) ? fallback : Number(input.value));
    s.system = el.system.value;
    s.temperature = Math.min(2, Math.max(0, num(el.temperature, DEFAULT_SETTINGS.temperature)));
    s.top_p = Math.min(1, Math.max(0.01, num(el.top_p, DEFAULT_SETTINGS.top_p)));
    s.max_tokens = Math.max(1, Math.round(num(el.max_tokens, DEFAULT_SETTINGS.max_tokens)));
    s.json_mode = el.jsonMode.checked;
    s.schema = el.schema.value;
    saveStore();
    renderMessages();
  }

  el.settingsForm.addEventListener("submit", (e) => {
    if (el.jsonMode.checked) {
      try {
        const schema = JSON.parse(el.schema.value);
        if (typeof schema !== "object" || schema === null) throw new Error("a schema is a JSON object");
      } catch (err) {
        e.preventDefault(); // keep the dialog open until the schema parses
        el.schemaError.textContent = t("schemaBad") + err.message;
        el.schema.focus();
        return;
      }
    }
  });
  el.settings.addEventListener("close", readSettings);

  // --- start ----------------------------------------------------------------------------------
  applyLanguage();
  window.hljs.configure({ ignoreUnescapedHTML: true });
  loadStore();
  saveStore();
  render();
  el.prompt.focus();
  loadModels();
  loadMcp();
})();
