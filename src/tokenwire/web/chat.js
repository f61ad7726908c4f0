// tokenwire's chat page: keeps the conversation and sends it as `messages`, streams each answer through the
// browser client (client.js, which speaks the WebSocket protocol of docs/protocol.md, reconnects with backoff and
// resumes a running answer where it stopped), and renders answers as safe Markdown (markdown.js).
// An ES module: relative to static/chat.js, ../client.js is the server's /client.js (under its path prefix, if any).
import { TokenwireClient } from "../client.js";

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
const THEME = "tokenwire.theme";
const AFFINITY = "tokenwire.affinity";
const CHAT = "tokenwire.chat";  // this tab's conversation and running answer, kept across reloads

let client = null;      // the connection (client.js): it reconnects and resumes running answers by itself
let counter = 0;
let conversation = [];  // finished turns: {role, content}
let current = null;     // the answer being streamed: {gen (client.js's Generation), el, text, ...}
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
// After an answer ends: "connected" when the connection is up, else the status as it is.
function refreshConn() {
  if (client.state === "open") setConn("open", "connected");
  else setConn(ui.conn.dataset.state, ui.conn.textContent);
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

// The client connects to ws next to /client.js (relative to the page, so that it also works behind a proxy that
// serves tokenwire under a path, /llm/). A key goes as the subprotocol bearer.KEY when it is a valid token, else
// as ?api_key= (browsers cannot set an Authorization header on a WebSocket).
function makeClient() {
  const c = new TokenwireClient({ apiKey: localStorage.getItem(KEY) || "", affinity: affinity() });
  c.addEventListener("state", (e) => {
    const { state, attempt, delayMs } = e.detail;
    if (state === "open") setConn("open", "connected");
    else if (state === "connecting" && !attempt) setConn("connecting", "connecting…");
    else if (state === "connecting") setConn("reconnecting", "reconnecting…");
    else if (state === "reconnecting") setConn(state, `disconnected, retrying in ${(delayMs / 1000).toFixed(1)} s…`);
    else setConn("closed", "disconnected");  // the key was refused: the unauthorized event says so
  });
  c.addEventListener("hello", (e) => hello(e.detail));
  c.addEventListener("notice", (e) => showNotice(e.detail));
  c.addEventListener("error", (e) => setConn(ui.conn.dataset.state, `error: ${e.detail.content}`));
  c.addEventListener("unauthorized", () => {  // no point retrying with the same key: ask for one
    setConn("closed", c.apiKey ? "API key rejected" : "API key needed");
    $("key-form").hidden = false;
    $("api-key").focus();
  });
  return c;
}

const INTERRUPTED = "connection lost; the answer is incomplete. Regenerate to try again.";

function hello(msg) {
  ui.model.textContent = msg.model || "";
  limits = msg.limits || {};
  if (limits.max_tokens) ui.maxTokens.max = String(limits.max_tokens);
}

// An operator's broadcast, or the server restarting: shown above the conversation until dismissed.
function showNotice(msg) {
  ui.noticeText.textContent = String(msg.content || "");
  ui.notice.dataset.level = msg.level === "warning" ? "warning" : "info";
  ui.notice.hidden = !msg.content;
}

// Reads one answer's messages from the client (each once, in order, across reconnections) until it ends.
async function stream(answer) {
  try {
    for await (const ev of answer.gen) {
      if (ev.type === "detached") {  // the server keeps it running for a while: the client resumes it
        setNote(answer, "connection lost; resuming…");
      } else if (ev.type === "resumed") {
        setNote(answer, "");
      } else if (ev.type === "started") {
        answer.truncated = Number(ev.truncated_messages) || 0;
      } else if (ev.type === "token" || ev.type === "tokens") {
        if (answer.ttftMs === null) answer.ttftMs = Math.round(performance.now() - answer.sentAt);
        answer.text += ev.content;
        answer.tokens += ev.tokens || 1;
        scheduleRender();
      }
    }
  } catch (err) {
    if (current !== answer) return;
    if (err.lost) finish("interrupted", INTERRUPTED);  // the server no longer has it, or refused the key
    else finish("error", `error: ${err.message}`);
    return;
  }
  if (current !== answer) return;  // left (New chat)
  const gen = answer.gen;
  answer.timings = gen.timings;
  answer.tokens = gen.usage ? gen.usage.completion_tokens : answer.tokens;
  const notes = { cancelled: "stopped", length: "max tokens reached" };
  finish(gen.finishReason === "cancelled" ? "stopped" : "done", notes[gen.finishReason] || "");
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

// The generate message's fields for ``turns`` as {fields, dropped}: while it is over the server's limits (hello's
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
  delete base.type;
  delete base.id;
  return { fields: base, dropped };
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
    el, text: "", tokens: 0, sentAt: performance.now(), ttftMs: null, timings: null, stopRequested: false,
    leftOut: request.dropped, gen: client.generate(request.fields, { id }),
  };
  stream(current);
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
  refreshConn();
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
  const gen = current && current.gen;
  const answer = current && {
    id: gen.id, session: gen.session, resumeToken: gen.resumeToken, lastSeq: gen.lastSeq, text: current.text,
    tokens: current.tokens, ttftMs: current.ttftMs, stopRequested: current.stopRequested,
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
    const gen = client.resume({
      id: a.id, session: typeof a.session === "string" ? a.session : null, afterSeq: a.lastSeq,
      resumeToken: typeof a.resumeToken === "string" ? a.resumeToken : null,
    });
    current = {
      el, text: a.text, tokens: Number(a.tokens) || 0, sentAt: performance.now(),
      ttftMs: Number.isFinite(a.ttftMs) ? a.ttftMs : null, timings: null, stopRequested: a.stopRequested === true, gen,
    };
    if (current.stopRequested) gen.cancel();  // sent once resumed
    renderAnswer(current);
    setNote(current, "page reloaded; resuming…");
    stream(current);
    ui.stop.hidden = false;
  } else if (last) {
    addRegenerate(last.querySelector(".meta"));
  }
}

function regenerate() {
  if (current || client.state !== "open") return;
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
  if (!text.trim() || client.state !== "open" || current) return;
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
  current.stopRequested = true;
  current.gen.cancel();  // while the connection is down, the client sends it once the answer is resumed
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
  // Left behind: cancelled, at once or (on a lost connection) once the client has resumed it.
  const left = current;
  current = null;
  if (left) left.gen.return();
  conversation = [];
  ui.messages.replaceChildren();
  ui.stop.hidden = true;
  saveChat();
  refreshConn();
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
  client.apiKey = localStorage.getItem(KEY);
  client.connect().catch(() => { /* shown by the unauthorized and state events */ });
});

// Reloading or leaving the page closes the socket with 1001: the server keeps the answer running for a
// while, and the reloaded page resumes it from the last seq saved here.
window.addEventListener("pagehide", saveChat);

applyTheme(localStorage.getItem(THEME));
loadSettings();
client = makeClient();
restoreChat();
client.connect().catch(() => { /* shown by the unauthorized and state events */ });
ui.prompt.focus();
