// tokenwire's browser client: one ES module, no dependencies, no build step. The server serves it at /client.js
// (under the same path prefix as the rest of its pages); the chat page imports it too.
//
//   import { TokenwireClient } from "/client.js";
//   const client = new TokenwireClient();                  // connects to the server that served this module
//   await client.connect();
//   const gen = client.generate({ messages: [{ role: "user", content: "Hi" }] });
//   for await (const ev of gen) if (ev.type === "token") out.textContent += ev.content;
//   console.log(gen.finishReason, gen.usage);
//
// It speaks the WebSocket protocol of docs/protocol.md: it answers the server's pings, reconnects with exponential
// backoff when the connection drops, and resumes every generation still running on the new connection from the
// last message it received, so that each message of a generation reaches the reader once and in order.

const TOKEN = /^[A-Za-z0-9._~-]+$/;  // what a WebSocket subprotocol can carry

/**
 * An error that ended a generation: the server's `error` message (`code`, `content` as `message`, `param`,
 * `retry_after_s` as `retryAfterS`), or the client's own (`closed`, `connection_lost`, `unauthorized`).
 */
export class TokenwireError extends Error {
  /**
   * @param {string} code the protocol's error code (`invalid_request`, `not_found`, `overloaded`, ...)
   * @param {string} message a sentence naming the problem
   * @param {{param?: string|null, retryAfterS?: number|null, id?: string|null, lost?: boolean}} [details]
   */
  constructor(code, message, { param = null, retryAfterS = null, id = null, lost = false } = {}) {
    super(message);
    this.name = "TokenwireError";
    /** @type {string} */ this.code = code;
    /** @type {string|null} the request field at fault, when there is one */ this.param = param;
    /** @type {number|null} when trying again later may succeed (`overloaded`), in how many seconds */
    this.retryAfterS = retryAfterS;
    /** @type {string|null} the generation's id */ this.id = id;
    /**
     * True when the generation was lost with its connection rather than ended by the server: the server no
     * longer had it when the client came back (`not_found`), refused the key on reconnecting, or the client was
     * closed or could not reconnect. Its text is incomplete; asking again is the way on.
     * @type {boolean}
     */
    this.lost = lost;
  }

  /** @param {any} msg a server `error` message @param {boolean} [lost] */
  static fromMessage(msg, lost = false) {
    return new TokenwireError(String(msg.code || "error"), String(msg.content || msg.code || "error"), {
      param: msg.param ?? null,
      retryAfterS: typeof msg.retry_after_s === "number" ? msg.retry_after_s : null,
      id: msg.id ?? null,
      lost,
    });
  }
}

/**
 * One generation: an async iterator of its messages, in order, each once, across reconnections.
 *
 * Yields the server's messages as they are (docs/protocol.md): `started` (`seq` 0, `prompt_tokens`,
 * `resume_token`), `token`/`tokens` (`content`, `tokens`, `seq`), `resumed` (after a reconnection); and
 * `{type: "detached"}` when the connection was lost (the client reconnects and resumes it). The loop ends after
 * `complete` (see `finishReason`, `usage`, `timings`); an `error` for the generation is thrown as a
 * {@link TokenwireError}. Leaving the loop early (`break`, `return`, an exception) cancels the generation.
 */
export class Generation {
  /** @param {TokenwireClient} client @param {string} id @param {object|null} message the generate message */
  constructor(client, id, message) {
    /** @type {string} the generation's id, as sent */ this.id = id;
    /** @type {string|null} the session of the connection it started on (with `id`, it names it for resume) */
    this.session = null;
    /** @type {string|null} from `started`: the secret that lets a resume take it over from an open connection */
    this.resumeToken = null;
    /** @type {number} the `seq` of the last message the iterator has handed out (what to resume after) */
    this.lastSeq = -1;
    /** @type {string} the text received so far (all of it, once finished) */ this.text = "";
    /** @type {number|null} from `started` */ this.promptTokens = null;
    /** @type {string|null} from `complete`: `stop`, `length` or `cancelled` */ this.finishReason = null;
    /** @type {object|null} from `complete`: {prompt_tokens, completion_tokens, total_tokens, cached_tokens} */
    this.usage = null;
    /** @type {object|null} from `complete`: {queue_ms, ttft_ms, total_ms, tokens_per_second} */ this.timings = null;
    /** @type {boolean} it has ended: `complete`, or an error (see `error`) */ this.done = false;
    /** @type {TokenwireError|null} what ended it, if not `complete` */ this.error = null;
    this._client = client;
    this._message = message;
    // pending (not sent yet), live (on the open connection), detached (connection lost), resuming, done
    this._phase = message ? "pending" : "detached";
    this._received = -1;  // the newest seq received: what the client resumes after
    this._queue = [];     // messages received, not yet taken by the iterator
    this._waiters = [];   // next() calls waiting for a message
    this._closed = false; // the iterator was left (return()): nothing more is queued
    this._thrown = false;
    this._cancel = false;
  }

  /**
   * Ask the server to stop it; the iterator then ends with `finishReason` `"cancelled"` (keeping the text so far).
   * While the connection is down, the cancel is sent as soon as the generation is resumed.
   */
  cancel() {
    if (this.done || this._cancel) return;
    this._cancel = true;
    if (this._phase === "pending") {  // never sent: nothing to tell the server
      this.finishReason = "cancelled";
      this._finish(null);
    } else if (this._phase === "live" || this._phase === "resuming") {
      this._client._send({ type: "cancel", id: this.id });
    }
  }

  [Symbol.asyncIterator]() { return this; }

  /** @returns {Promise<IteratorResult<any>>} */
  next() {
    if (this._queue.length) return Promise.resolve(this._take());
    if (this.done || this._closed) return this._end();
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /** Leave the iteration: a generation still running is cancelled. */
  return() {
    this.cancel();
    this._closed = true;
    this._queue.length = 0;
    for (const w of this._waiters.splice(0)) w.resolve({ value: undefined, done: true });
    return Promise.resolve({ value: undefined, done: true });
  }

  _take() {
    const ev = this._queue.shift();
    if (typeof ev.seq === "number") this.lastSeq = ev.seq;
    return { value: ev, done: false };
  }

  _end() {
    if (this.error && !this._thrown && !this._closed) {
      this._thrown = true;
      return Promise.reject(this.error);
    }
    if (this.done) this.lastSeq = Math.max(this.lastSeq, this._received);
    return Promise.resolve({ value: undefined, done: true });
  }

  _push(ev) {
    if (this._closed) return;
    this._queue.push(ev);
    this._wake();
  }

  _wake() {
    while (this._waiters.length && (this._queue.length || this.done)) {
      const w = this._waiters.shift();
      if (this._queue.length) w.resolve(this._take());
      else this._end().then(w.resolve, w.reject);
    }
  }

  _finish(error) {
    this.done = true;
    this.error = error;
    this._phase = "done";
    if (this._client._generations.get(this.id) === this) this._client._generations.delete(this.id);
    this._wake();
  }

  // The connection is open (its hello came): send the generate, or the resume (and a cancel asked meanwhile).
  _attach() {
    const client = this._client;
    if (this.done || client.state !== "open") return;
    if (this._phase === "pending") {
      this.session = client.session;
      this._phase = "live";
      const message = this._message;
      this._message = null;
      client._send(message);
    } else if (this._phase === "detached") {
      this._phase = "resuming";
      const resume = { type: "resume", id: this.id, after_seq: this._received };
      if (this.session) resume.session = this.session;
      if (this.resumeToken) resume.resume_token = this.resumeToken;
      client._send(resume);
      if (this._cancel) client._send({ type: "cancel", id: this.id });
    }
  }

  // The connection was lost and the client will reconnect: resume once it has.
  _detach() {
    if (this._phase === "live") {
      this._phase = "detached";
      this._push({ type: "detached", id: this.id });
    } else if (this._phase === "resuming") {
      this._phase = "detached";
    }
  }

  _receive(msg) {
    if (this.done) return;
    if (msg.type === "resumed") {
      if (this._phase === "resuming") this._phase = "live";
      this._push(msg);
      return;
    }
    if (msg.type === "error" && typeof msg.seq !== "number") {
      if (this._phase === "resuming") this._finish(TokenwireError.fromMessage(msg, true));  // the server lost it
      else if (this._received < 0) this._finish(TokenwireError.fromMessage(msg));  // the generate was refused
      return;  // otherwise about a message that crossed the generation's end (a late cancel): it goes on
    }
    if (typeof msg.seq === "number") {  // each message once, in order, across reconnections
      if (msg.seq <= this._received) return;
      this._received = msg.seq;
    }
    if (msg.type === "started") {
      if (typeof msg.resume_token === "string") this.resumeToken = msg.resume_token;
      if (typeof msg.prompt_tokens === "number") this.promptTokens = msg.prompt_tokens;
      this._push(msg);
    } else if (msg.type === "token" || msg.type === "tokens") {
      this.text += msg.content;
      this._push(msg);
    } else if (msg.type === "complete") {
      this.finishReason = msg.finish_reason ?? null;
      this.usage = msg.usage ?? null;
      this.timings = msg.timings ?? null;
      this._finish(null);
    } else if (msg.type === "error") {
      this._finish(TokenwireError.fromMessage(msg));
    } else {
      this._push(msg);
    }
  }
}

/**
 * @typedef {object} ClientOptions
 * @property {string} [apiKey] sent as the subprotocol `bearer.KEY` when it is a token of [A-Za-z0-9._~-], else
 *   as `?api_key=` (a browser cannot set an Authorization header on a WebSocket). Can be changed later.
 * @property {string} [affinity] added as `?affinity=`: a load balancer that hashes it sends reconnections to the
 *   process that runs their generations (deploy/nginx.conf)
 * @property {boolean} [reconnect=true] reconnect after a lost connection (not after the key was refused)
 * @property {number} [minDelayMs=500] the first wait before reconnecting; it doubles at each failed attempt...
 * @property {number} [maxDelayMs=10000] ...up to this; each wait varies by ±25% (jitter)
 */

/**
 * A connection to a tokenwire server, kept open: it reconnects and resumes running generations by itself.
 *
 * Events (`addEventListener`), each a CustomEvent whose `detail` is:
 * - `state`: `{state, attempt, delayMs}`: `connecting` (a socket is being opened; `attempt` 0 at first, then the
 *   retry's number), `open` (its `hello` came), `reconnecting` (waiting `delayMs` before the next attempt),
 *   `closed` (not connected and not trying: `close()`, a refused key, or `reconnect: false`)
 * - `hello`: the server's `hello` message (session, model, protocol, limits), at each connection
 * - `notice`: a `notice` message (an operator's announcement, or the server draining)
 * - `unauthorized`: the server's `error` refusing the key (or the page's origin); the client stops retrying: set
 *   `apiKey` and call `connect()` again
 * - `error`: an `error` message about the connection rather than a generation (no `id`), e.g. `overloaded`
 */
export class TokenwireClient extends EventTarget {
  /**
   * @param {string|URL} [url] the WebSocket URL (an http(s) URL or one relative to the page is turned into
   *   ws(s)); by default `ws` next to this module, i.e. `/ws` of the server that served it (under its prefix)
   * @param {ClientOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    if (url && typeof url === "object" && !(url instanceof URL)) [url, options] = [undefined, url];
    /** @type {string|null} */ this.url = url == null ? null : String(url);
    /** @type {string} */ this.apiKey = options.apiKey || "";
    /** @type {string} */ this.affinity = options.affinity || "";
    /** @type {boolean} */ this.reconnect = options.reconnect !== false;
    /** @type {number} */ this.minDelayMs = options.minDelayMs ?? 500;
    /** @type {number} */ this.maxDelayMs = options.maxDelayMs ?? 10000;
    /** @type {"connecting"|"open"|"reconnecting"|"closed"} */ this.state = "closed";
    /** @type {any} the latest `hello` (kept while reconnecting) */ this.hello = null;
    this._ws = null;
    this._timer = null;
    this._attempt = 0;
    this._refused = null;        // the unauthorized error of the current socket
    this._waiters = [];          // connect() calls waiting for a hello
    /** @type {Map<string, Generation>} */ this._generations = new Map();  // running ones only
    this._counter = 0;
  }

  /** @type {string|null} the connection's session (from the latest `hello`) */
  get session() { return this.hello ? this.hello.session ?? null : null; }
  /** @type {string|null} the model the server serves */
  get model() { return this.hello ? this.hello.model ?? null : null; }
  /** @type {object} what the server accepts: max_message_bytes, max_tokens, ... (docs/protocol.md) */
  get limits() { return (this.hello && this.hello.limits) || {}; }

  /**
   * Open the connection, if it is not open or being opened. Resolves with the `hello` message once connected
   * (after as many retries as it takes); rejects with a {@link TokenwireError} when the server refuses the key
   * (`unauthorized`), `close()` is called (`closed`) or, with `reconnect: false`, the connection fails.
   * @returns {Promise<any>}
   */
  connect() {
    if (this.state === "open") return Promise.resolve(this.hello);
    const hello = new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
    this._start();
    return hello;
  }

  /**
   * Start a generation. It is sent at once if connected, else as soon as the connection opens (connecting if
   * needed).
   * @param {object} request the `generate` message's fields (docs/protocol.md): `messages` or `prompt`,
   *   `max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `batch`, ...
   * @param {{id?: string}} [options] the generation's id (by default a fresh one)
   * @returns {Generation}
   */
  generate(request, { id } = {}) {
    if (!request || typeof request !== "object") throw new TypeError("generate() takes the request's fields");
    const gid = this._claim(id);
    return this._add(new Generation(this, gid, { ...request, type: "generate", id: gid }));
  }

  /**
   * Continue a generation that was started elsewhere (another client, or this page before a reload): the server
   * sends what came after `afterSeq`, then the rest as it comes. Ends with a {@link TokenwireError} (`lost`) when
   * the server no longer has it.
   * @param {{id: string, session?: string|null, afterSeq?: number, resumeToken?: string|null}} which
   * @returns {Generation}
   */
  resume({ id, session = null, afterSeq = -1, resumeToken = null }) {
    if (id == null) throw new TypeError("resume() needs the generation's id");
    const gen = new Generation(this, this._claim(id), null);
    gen.session = session;
    gen.resumeToken = resumeToken;
    gen._received = gen.lastSeq = afterSeq;
    return this._add(gen);
  }

  /**
   * Close the connection and stop reconnecting. With code 1000 (the default) the server aborts the generations
   * still running; with a code of 3000-4999 it keeps them resumable for a while (see `resume`). Running
   * generations end with a {@link TokenwireError} `closed`.
   * @param {number} [code] @param {string} [reason]
   */
  close(code = 1000, reason) {
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(code, reason);
    this._stop(new TokenwireError("closed", "the client was closed", { lost: true }));
  }

  // -- internals
  _claim(id) {
    const gid = id == null ? `g-${Date.now().toString(36)}-${++this._counter}` : String(id);
    if (this._generations.has(gid)) {
      throw new TokenwireError("duplicate_id", `a generation with id ${JSON.stringify(gid)} is already running`,
        { param: "id", id: gid });
    }
    return gid;
  }

  _add(gen) {
    this._generations.set(gen.id, gen);
    this._start();
    gen._attach();
    return gen;
  }

  _start() {
    if (this._ws || this._timer) return;
    this._attempt = 0;
    this._open();
  }

  _url() {
    const here = typeof location !== "undefined" ? location.href : import.meta.url;
    const url = new URL(this.url ?? new URL("ws", import.meta.url).href, here);
    if (url.protocol === "http:") url.protocol = "ws:";
    else if (url.protocol === "https:") url.protocol = "wss:";
    url.hash = "";
    if (this.url == null) url.search = "";
    if (this.affinity) url.searchParams.set("affinity", this.affinity);
    const protocols = [];
    if (this.apiKey && TOKEN.test(this.apiKey)) protocols.push(`bearer.${this.apiKey}`);
    else if (this.apiKey) url.searchParams.set("api_key", this.apiKey);
    return [url.href, protocols];
  }

  _open() {
    this._timer = null;
    this._refused = null;
    let ws;
    try {
      const [href, protocols] = this._url();
      ws = new WebSocket(href, protocols);
    } catch (err) {  // a URL or key a WebSocket cannot take
      this._stop(new TokenwireError("connection_failed", String(err && err.message), { lost: true }));
      return;
    }
    this._ws = ws;
    ws.onmessage = (event) => { if (this._ws === ws) this._onMessage(event.data); };
    ws.onclose = () => { if (this._ws === ws) this._onClose(); };
    this._setState("connecting");
  }

  _send(msg) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  _onMessage(data) {
    let msg;
    try { msg = JSON.parse(data); } catch (e) { return; }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "hello") { this._onHello(msg); return; }
    if (msg.type === "ping") { this._send({ type: "pong", ts: msg.ts }); return; }
    if (msg.type === "notice") { this._emit("notice", msg); return; }
    if (msg.type === "error" && msg.code === "unauthorized") { this._refused = msg; return; }
    if (msg.id != null) {
      const gen = this._generations.get(String(msg.id));
      if (gen) gen._receive(msg);
    } else if (msg.type === "error") {
      this._emit("error", msg);
    }
  }

  _onHello(msg) {
    this.hello = msg;
    this._attempt = 0;
    this.state = "open";
    for (const gen of [...this._generations.values()]) gen._attach();
    this._setState("open");
    this._emit("hello", msg);
    for (const w of this._waiters.splice(0)) w.resolve(msg);
  }

  _onClose() {
    this._ws = null;
    const refused = this._refused;
    if (refused) {  // the same key would be refused again: stop until connect() is called
      this._stop(new TokenwireError("unauthorized", String(refused.content || "unauthorized"), { lost: true }));
      this._emit("unauthorized", refused);
      return;
    }
    if (!this.reconnect) {
      this._stop(new TokenwireError("connection_lost", "the connection was lost", { lost: true }));
      return;
    }
    for (const gen of this._generations.values()) gen._detach();
    const delayMs = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** this._attempt) * (0.75 + Math.random() * 0.5);
    this._attempt += 1;
    this._timer = setTimeout(() => this._open(), delayMs);
    this._setState("reconnecting", { delayMs });
  }

  // Not connected and not trying: every running generation and connect() ends with ``error``.
  _stop(error) {
    const gens = [...this._generations.values()];
    this._generations.clear();
    for (const gen of gens) {
      gen._finish(new TokenwireError(error.code, error.message, { id: gen.id, lost: true }));
    }
    for (const w of this._waiters.splice(0)) w.reject(error);
    this._attempt = 0;
    if (this.state !== "closed") this._setState("closed");
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, attempt: this._attempt, ...extra });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
