// tokenwire's chat page: streams answers over the WebSocket protocol (docs/protocol.md), keeps the conversation
// and sends it as `messages`, reconnects with backoff and resumes a running answer where it stopped (`resume`
// with the last `seq` seen), and renders answers as safe Markdown (markdown.js).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), prompt: $("prompt"), send: $("send"), stop: $("stop"), conn: $("conn"),
    model: $("model"), form: $("composer"), settings: $("settings"), settingsToggle: $("settings-toggle"),
    system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
    maxTokens: $("max-tokens"), newChat: $("new-chat"), theme: $("theme"), problem: $("problem"),
    notice: $("notice"), noticeText: $("notice-text"), noticeClose: $("notice-close"),
  };
  const STORE = "tokenwire.settings";
  const KEY = "tokenwire.key";
  let needKey = false;
  let keySent = false;    // the last connection carried a key: an unauthorized answer means it was wrong
  const THEME = "tokenwire.theme";
  const AFFINITY = "tokenwire.affinity";
  const CHAT = "tokenwire.chat";  // this tab's conversation and running answer, kept across reloads

  let ws = null;
  let attempt = 0;
  let reconnectTimer = null;
  let counter = 0;
  let conversation = [];  // finished turns: {role, content}
  let current = null;     // the answer being streamed
  let session = null;     // this connection's session (hello): with an id, it names a generation for resume
  let abandoned = [];     // answers left running on a lost connection by New chat: cancelled once reconnected
  let limits = {};        // what the server accepts (hello's limits)

  // -- settings, remembered in the browser
  function loadSettings() {
    let s = {};
    try { s = JSON.parse(localStorage.getItem(STORE) || "{}"); } catch (e) { s = {}; }
    ui.system.value = typeof s.system === "string" ? s.system : "";
    ui.temperature.value = Number.isFinite(s.temperature) ? s.temperature : 0.7;
    ui.maxTokens.value = Number.isInteger(s.max_tokens) ? s.max_tokens : 512;
    ui.temperatureValue.textContent = ui.temperature.value;
  }
  function saveSettings() {
    ui.temperatureValue.textContent = ui.temperature.value;
    localStorage.setItem(STORE, JSON.stringify({
      system: ui.system.value,
      temperature: parseFloat(ui.temperature.value),
      max_tokens: Math.max(1, parseInt(ui.maxTokens.value, 10) || 512),
    }));
  }
  function applyTheme(theme) {
    if (theme) document.documentElement.dataset.theme = theme;
    else delete document.documentElement.dataset.theme;
  }

  // -- connection
  function setConn(state, text) {
    ui.conn.dataset.state = state;
    ui.conn.textContent = text;
    ui.send.disabled = state !== "open" || current !== null;
  }

  // One token per browser tab, kept across reloads: a load balancer can send the tab's reconnections to the
  // process that runs its answer (deploy/nginx.conf hashes ?affinity=), so that the answer can be resumed.
  function affinity() {
    let token = null;
    try { token = sessionStorage.getItem(AFFINITY); } catch (e) { token = null; }
    if (!token) {
      token = Array.from(crypto.getRandomValues(new Uint8Array(9)), (b) => b.toString(16).padStart(2, "0")).join("");
      try { sessionStorage.setItem(AFFINITY, token); } catch (e) { /* private mode: one token per page load */ }
    }
    return token;
  }

  function connect() {
    clearTimeout(reconnectTimer);
    // Relative to the page, so that it also works behind a proxy that serves tokenwire under a path (/llm/).
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = url.hash = "";
    url.searchParams.set("affinity", affinity());
    setConn(attempt ? "reconnecting" : "connecting", attempt ? "reconnecting…" : "connecting…");
    // A key goes as the subprotocol bearer.KEY when it is a valid token, else as ?api_key= (browsers cannot set
    // an Authorization header on a WebSocket).
    const key = localStorage.getItem(KEY) || "";
    keySent = key !== "";
    const protocols = [];
    if (key && /^[A-Za-z0-9._~-]+$/.test(key)) protocols.push(`bearer.${key}`);
    else if (key) url.searchParams.set("api_key", key);
    const sock = new WebSocket(url.href, protocols);
    ws = sock;
    sock.onopen = () => { attempt = 0; setConn("open", "connected"); };
    sock.onmessage = (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      handle(msg);
    };
    sock.onclose = () => {
      if (ws !== sock) return;
      ws = null;
      session = null;
      if (current && needKey) finish("interrupted", INTERRUPTED);
      else if (current) {  // the server keeps it running for a while: resume it once reconnected
        current.detached = true;
        setNote(current, "connection lost; resuming…");
      }
      if (needKey) {  // no point retrying with the same key: ask for one
        setConn("closed", keySent ? "API key rejected" : "API key needed");
        $("key-form").hidden = false;
        $("api-key").focus();
        return;
      }
      const delay = Math.min(10000, 500 * 2 ** attempt) * (0.75 + Math.random() * 0.5);
      attempt += 1;
      setConn("reconnecting", `disconnected, retrying in ${(delay / 1000).toFixed(1)} s…`);
      reconnectTimer = setTimeout(connect, delay);
    };
  }

  const INTERRUPTED = "connection lost; the answer is incomplete. Regenerate to try again.";

  function hello(msg) {
    ui.model.textContent = msg.model || "";
    session = msg.session || null;
    limits = msg.limits || {};
    if (limits.max_tokens) ui.maxTokens.max = String(limits.max_tokens);
    for (const gone of abandoned) {
      ws.send(JSON.stringify(resumeMessage(gone)));
      ws.send(JSON.stringify({ type: "cancel", id: gone.id }));
    }
    abandoned = [];
    if (current && current.detached) {
      current.resuming = true;
      ws.send(JSON.stringify(resumeMessage(current)));
      if (current.stopRequested) ws.send(JSON.stringify({ type: "cancel", id: current.id }));
    }
  }

  // The resume_token of the answer's started message proves it is ours: the server may still hold the old
  // connection open (a half-open socket), and then it hands the answer over only to the token's holder.
  function resumeMessage(answer) {
    const msg = { type: "resume", id: answer.id, session: answer.session, after_seq: answer.lastSeq };
    if (answer.resumeToken) msg.resume_token = answer.resumeToken;
    return msg;
  }

  // An operator's broadcast, or the server restarting: shown above the conversation until dismissed.
  function showNotice(msg) {
    ui.noticeText.textContent = String(msg.content || "");
    ui.notice.dataset.level = msg.level === "warning" ? "warning" : "info";
    ui.notice.hidden = !msg.content;
  }

  function handle(msg) {
    if (msg.type === "hello") { hello(msg); return; }
    if (msg.type === "notice") { showNotice(msg); return; }
    if (msg.type === "error" && msg.code === "unauthorized") { needKey = true; return; }
    if (msg.type === "ping") { if (ws) ws.send(JSON.stringify({ type: "pong", ts: msg.ts })); return; }
    if (!current || msg.id !== current.id) {
      if (msg.type === "error" && !msg.id) setConn(ui.conn.dataset.state, `error: ${msg.content}`);
      return;
    }
    if (msg.type === "resumed") {
      current.detached = current.resuming = false;
      setNote(current, "");
      return;
    }
    if (msg.type === "error" && current.resuming && msg.seq === undefined) {  // the server no longer has it
      finish("interrupted", INTERRUPTED);
      return;
    }
    if (typeof msg.seq === "number") {  // each message of a generation once, in order, across reconnections
      if (msg.seq <= current.lastSeq) return;
      current.lastSeq = msg.seq;
    }
    if (msg.type === "started") {
      current.resumeToken = typeof msg.resume_token === "string" ? msg.resume_token : null;
      current.promptTokens = msg.prompt_tokens;
      current.truncated = Number(msg.truncated_messages) || 0;
    } else if (msg.type === "token" || msg.type === "tokens") {
      if (current.ttftMs === null) current.ttftMs = Math.round(performance.now() - current.sentAt);
      current.text += msg.content;
      current.tokens += msg.tokens || 1;
      scheduleRender();
    } else if (msg.type === "complete") {
      current.timings = msg.timings;
      current.tokens = msg.usage ? msg.usage.completion_tokens : current.tokens;
      const notes = { cancelled: "stopped", length: "max tokens reached" };
      finish(msg.finish_reason === "cancelled" ? "stopped" : "done", notes[msg.finish_reason] || "");
    } else if (msg.type === "error") {
      finish("error", `error: ${msg.content}`);
    }
  }

  // -- messages
  function addMessage(role, text) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    if (role === "user") {
      div.textContent = text;
    } else {
      const body = document.createElement("div");
      body.className = "body";
      const meta = document.createElement("div");
      meta.className = "meta";
      div.append(body, meta);
      div.dataset.updates = "0";
    }
    ui.messages.appendChild(div);
    ui.messages.scrollTop = ui.messages.scrollHeight;
    return div;
  }

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => { renderQueued = false; if (current) renderAnswer(current); });
  }
  function renderAnswer(answer) {
    const body = answer.el.querySelector(".body");
    body.replaceChildren(TokenwireMarkdown.render(answer.text));
    answer.el.dataset.updates = String(parseInt(answer.el.dataset.updates, 10) + 1);
    const nearBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 120;
    if (nearBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // The generate message for ``turns`` as {data, dropped}: while it is over the server's limits (hello's
  // max_message_bytes, max_messages) the oldest turns are left out; null when the last turn alone is too big.
  const utf8 = new TextEncoder();
  function buildRequest(id, turns) {
    const system = ui.system.value.trim();
    const head = system ? [{ role: "system", content: system }] : [];
    const wanted = Math.max(1, parseInt(ui.maxTokens.value, 10) || 512);
    const base = {
      type: "generate", id, messages: head,
      truncate: "auto",  // a conversation longer than the context drops its oldest turns on the server
      temperature: parseFloat(ui.temperature.value),
      max_tokens: limits.max_tokens ? Math.min(wanted, limits.max_tokens) : wanted,
    };
    const sizes = turns.map((t) => utf8.encode(JSON.stringify(t)).length + 1);  // each with its comma
    let total = utf8.encode(JSON.stringify(base)).length + sizes.reduce((a, b) => a + b, 0);
    const maxBytes = limits.max_message_bytes || Infinity;
    const maxTurns = (limits.max_messages || Infinity) - head.length;
    let dropped = 0;
    while (total > maxBytes || turns.length - dropped > maxTurns) {
      if (turns.length - dropped <= 1) return null;
      total -= sizes[dropped];
      dropped += 1;
    }
    while (dropped && turns.length - dropped > 1 && turns[dropped].role !== "user") dropped += 1;  // start on a question
    base.messages = head.concat(turns.slice(dropped));
    return { data: JSON.stringify(base), dropped };
  }

  function nextId() {
    counter += 1;
    return `chat-${Date.now().toString(36)}-${counter}`;
  }

  function showProblem(text) {
    ui.problem.textContent = text;
    ui.problem.hidden = !text;
  }

  function startAnswer(id, request) {
    showProblem("");
    const el = addMessage("assistant", "");
    el.classList.add("typing");
    el.dataset.state = "streaming";
    el.setAttribute("aria-busy", "true");  // screen readers wait for the whole answer instead of every token
    current = {
      id, el, session, resumeToken: null, lastSeq: -1, text: "", tokens: 0, sentAt: performance.now(), ttftMs: null,
      timings: null, detached: false, resuming: false, stopRequested: false, leftOut: request.dropped,
    };
    ws.send(request.data);
    ui.stop.hidden = false;
    setConn("open", "connected");
    saveChat();
  }

  function noteSpan(text) {
    const span = document.createElement("span");
    span.className = "note";
    span.textContent = text;
    return span;
  }

  function setNote(answer, note) {
    const meta = answer.el.querySelector(".meta");
    meta.replaceChildren();
    if (note) meta.appendChild(noteSpan(note));
  }

  function finish(state, note) {
    const answer = current;
    current = null;
    renderAnswer(answer);
    answer.el.classList.remove("typing");
    answer.el.dataset.state = state;
    answer.el.setAttribute("aria-busy", "false");
    if (state === "done" || (state === "stopped" && answer.text)) {
      conversation.push({ role: "assistant", content: answer.text });
      answer.el.dataset.turn = String(conversation.length - 1);
    }
    const meta = answer.el.querySelector(".meta");
    meta.replaceChildren();
    const figures = [];
    if (answer.ttftMs !== null) figures.push(`TTFT ${answer.ttftMs} ms`);
    if (answer.timings && answer.timings.tokens_per_second) figures.push(`${answer.timings.tokens_per_second.toFixed(1)} tok/s`);
    figures.push(`${answer.tokens} tokens`);
    const fig = document.createElement("span");
    fig.className = "figures";
    fig.textContent = figures.join(" · ");
    meta.appendChild(fig);
    if (note) meta.appendChild(noteSpan(note));
    const leftOut = (answer.truncated || 0) + (answer.leftOut || 0);  // by the server, and by buildRequest
    if (leftOut) {
      const which = leftOut === 1 ? "the oldest message was" : `the ${leftOut} oldest messages were`;
      meta.appendChild(noteSpan(`${which} left out to fit the model's context`));
    }
    addRegenerate(meta);
    const stopHadFocus = document.activeElement === ui.stop;
    ui.stop.hidden = true;
    if (stopHadFocus) ui.prompt.focus();  // keyboard users are not left on a button that is gone
    setConn(ws ? "open" : "reconnecting", ws ? "connected" : ui.conn.textContent);
    saveChat();
  }

  function addRegenerate(meta) {
    document.querySelectorAll(".msg .regen").forEach((b) => b.remove());
    const regen = document.createElement("button");
    regen.type = "button"; regen.className = "regen"; regen.textContent = "Regenerate";
    regen.setAttribute("aria-label", "Regenerate the last answer");
    regen.addEventListener("click", regenerate);
    meta.appendChild(regen);
  }

  // -- the conversation survives a reload of the tab; a running answer is resumed where it stopped
  function saveChat() {
    const answer = current && {
      id: current.id, session: current.session, resumeToken: current.resumeToken, lastSeq: current.lastSeq,
      text: current.text, tokens: current.tokens, ttftMs: current.ttftMs, stopRequested: current.stopRequested,
    };
    try { sessionStorage.setItem(CHAT, JSON.stringify({ conversation, answer })); } catch (e) { /* full or off */ }
  }

  function restoreChat() {
    let saved = null;
    try { saved = JSON.parse(sessionStorage.getItem(CHAT) || "null"); } catch (e) { saved = null; }
    if (!saved || !Array.isArray(saved.conversation)) return;
    conversation = saved.conversation.filter((t) => t && typeof t.content === "string"
      && (t.role === "user" || t.role === "assistant"));
    let last = null;
    conversation.forEach((turn, i) => {
      const el = addMessage(turn.role, turn.content);
      if (turn.role === "assistant") {
        el.querySelector(".body").replaceChildren(TokenwireMarkdown.render(turn.content));
        el.dataset.state = "done";
        el.dataset.turn = String(i);
        last = el;
      }
    });
    const a = saved.answer;
    if (a && typeof a.id === "string" && Number.isInteger(a.lastSeq) && typeof a.text === "string") {
      const el = addMessage("assistant", "");
      el.classList.add("typing");
      el.dataset.state = "streaming";
      el.setAttribute("aria-busy", "true");
      current = {
        id: a.id, el, session: typeof a.session === "string" ? a.session : null, lastSeq: a.lastSeq, text: a.text,
        resumeToken: typeof a.resumeToken === "string" ? a.resumeToken : null,
        tokens: Number(a.tokens) || 0, sentAt: performance.now(), ttftMs: Number.isFinite(a.ttftMs) ? a.ttftMs : null,
        timings: null, detached: true, resuming: false, stopRequested: a.stopRequested === true,
      };
      renderAnswer(current);
      setNote(current, "page reloaded; resuming…");
      ui.stop.hidden = false;
    } else if (last) {
      addRegenerate(last.querySelector(".meta"));
    }
  }

  function regenerate() {
    if (current || !ws) return;
    const last = ui.messages.lastElementChild;
    if (last && last.classList.contains("assistant")) {
      if (last.dataset.turn !== undefined) conversation.pop();
      last.remove();
    }
    if (!conversation.length || conversation[conversation.length - 1].role !== "user") return;
    const id = nextId();
    const request = buildRequest(id, conversation);
    if (request) startAnswer(id, request);
    else showProblem(tooLong());
  }

  function tooLong() {
    return `This message is too long: the server accepts at most ${limits.max_message_bytes} bytes per request.`;
  }

  function send() {
    const text = ui.prompt.value;
    if (!text.trim() || !ws || ws.readyState !== WebSocket.OPEN || current) return;
    // A question whose answer failed stays on the page but is not sent again (Regenerate retries it).
    const unanswered = conversation.length && conversation[conversation.length - 1].role === "user";
    const turns = (unanswered ? conversation.slice(0, -1) : conversation).concat([{ role: "user", content: text }]);
    const id = nextId();
    const request = buildRequest(id, turns);
    if (!request) { showProblem(tooLong()); return; }  // the text stays in the box, nothing is sent
    conversation = turns;
    addMessage("user", text);
    ui.prompt.value = "";
    autosize();
    startAnswer(id, request);
  }

  function autosize() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = `${ui.prompt.scrollHeight}px`;
  }

  // -- wiring
  ui.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  ui.prompt.addEventListener("input", () => { autosize(); showProblem(""); });
  function stop() {
    if (!current || current.stopRequested) return;
    current.stopRequested = true;  // sent after the resume when the connection is down
    if (ws && !current.detached) ws.send(JSON.stringify({ type: "cancel", id: current.id }));
  }
  ui.stop.addEventListener("click", stop);
  ui.noticeClose.addEventListener("click", () => { ui.notice.hidden = true; ui.prompt.focus(); });
  // Escape closes the settings panel when focus is in it, else stops the running answer.
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || e.isComposing) return;
    if (!ui.settings.hidden && ui.settings.contains(document.activeElement)) {
      toggleSettings();
      ui.settingsToggle.focus();
    } else if (current) {
      e.preventDefault();
      stop();
    }
  });
  ui.newChat.addEventListener("click", () => {
    if (current && current.detached) abandoned.push(current);
    else if (current && ws) ws.send(JSON.stringify({ type: "cancel", id: current.id }));
    current = null;
    conversation = [];
    ui.messages.replaceChildren();
    ui.stop.hidden = true;
    saveChat();
    setConn(ws ? "open" : "reconnecting", ws ? "connected" : ui.conn.textContent);
    ui.prompt.focus();
  });
  function toggleSettings() {
    ui.settings.hidden = !ui.settings.hidden;
    ui.settingsToggle.setAttribute("aria-expanded", String(!ui.settings.hidden));
  }
  ui.settingsToggle.addEventListener("click", toggleSettings);
  for (const input of [ui.system, ui.temperature, ui.maxTokens]) input.addEventListener("input", saveSettings);
  ui.theme.addEventListener("click", () => {
    const dark = document.documentElement.dataset.theme === "dark"
      || (!document.documentElement.dataset.theme && matchMedia("(prefers-color-scheme: dark)").matches);
    const next = dark ? "light" : "dark";
    localStorage.setItem(THEME, next);
    applyTheme(next);
  });

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY, $("api-key").value.trim());
    $("key-form").hidden = true;
    needKey = false;
    attempt = 0;
    connect();
  });

  // Reloading or leaving the page closes the socket with 1001: the server keeps the answer running for a
  // while, and the reloaded page resumes it from the last seq saved here.
  window.addEventListener("pagehide", saveChat);

  applyTheme(localStorage.getItem(THEME));
  loadSettings();
  restoreChat();
  connect();
  ui.prompt.focus();
})();
