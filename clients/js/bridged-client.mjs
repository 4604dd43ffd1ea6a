// bridged-client.mjs: the reference browser client of the bridged support chat.
// An ES module with no build step and no dependency (msgpack is optional: pass a codec).
// docs/websocket.md, "Browser clients", describes what it does and why.
//
//   import { BridgedClient } from "./bridged-client.mjs";
//   const chat = new BridgedClient({ url: "ws://127.0.0.1:3000", chatId: "alice",
//                                    getToken: async () => fetchTokenFromYourBackend() });
//   chat.addEventListener("update", (e) => show(e.detail.event, e.detail.replayed));
//   chat.connect();
//   const echo = await chat.send("Hello");   // resolves with the stored event (its echo)

const DEFAULT_LIMITS = { perSecond: 20, burst: 40 };

/** What to do after a close, by code (docs/websocket.md, close codes and readable refusals). */
export function closeAction(code, reason = "") {
  if (code === 4001 || code === 4401) return "refresh";   // token expired / missing / invalid
  if (code === 4410) return "drop-since";                  // since older than what is kept
  if (code === 4400 && reason.startsWith("since:")) return "drop-since";
  if (code === 4400 && reason.startsWith("last:")) return "drop-last";  // no newest events
  if (code === 4400 || code === 4403 || code === 4404) return "give-up";
  if (code === 4429 || code === 4503 || code === 4500) return "back-off";
  if (code === 1008 && reason === "rate limit exceeded") return "back-off";
  if (code === 1007 || code === 1008 || code === 1009) return "drop-message";
  return "reconnect";                                      // 1001, 1006, 1011, 1013, ...
}

/** The `exp` claim of a JWT (seconds), or null. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp : null;
  } catch {
    return null;
  }
}

function randomId() {
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

export class BridgedClient extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.url           ws:// or wss:// origin of the daemon (no path)
   * @param {string} o.chatId
   * @param {"json"|"msgpack"} [o.encoding]
   * @param {{encode: Function, decode: Function}} [o.msgpack]  required for msgpack
   * @param {(force: boolean) => Promise<string|null>} [o.getToken]  a fresh token, or null
   * @param {number} [o.refreshBeforeS]  get a new token this long before `exp` (30)
   * @param {Storage|null} [o.storage]  keeps the last eventId across page reloads
   * @param {number} [o.last]            events to open on when there is nothing to resume (20)
   * @param {boolean} [o.heartbeat]      ask for heartbeats and watch them (true)
   * @param {number} [o.minDelayMs]      backoff base (500); [o.maxDelayMs] its cap (30000)
   */
  constructor(o) {
    super();
    this.url = o.url.replace(/\/$/, "");
    this.chatId = o.chatId;
    this.encoding = o.encoding ?? "json";
    this.codec = o.msgpack ?? null;
    if (this.encoding === "msgpack" && !this.codec) throw new Error("msgpack needs a codec");
    this.getToken = o.getToken ?? (async () => null);
    this.refreshBeforeS = o.refreshBeforeS ?? 30;
    this.storage = o.storage ?? null;
    this.storageKey = `bridged:${this.url}:${this.chatId}:lastEventId`;
    this.last = o.last ?? 20;
    this.heartbeat = o.heartbeat ?? true;
    this.minDelayMs = o.minDelayMs ?? 500;
    this.maxDelayMs = o.maxDelayMs ?? 30000;
    this.lastEventId = this.storage?.getItem(this.storageKey) ?? null;
    this.state = "idle";         // idle, connecting, open, waiting, closed, gave-up
    this.attempt = 0;
    this.token = null;
    this.limits = DEFAULT_LIMITS;
    this.outbox = [];            // {clientMsgId, items, resolve, reject, sentAt}
    this.seen = new Set();       // eventIds shown (dedupe), bounded
    this._ws = null;
    this._timers = new Set();
    this._sequence = -1;
    this._live = false;          // the replay_end frame came: resends may go
    this._bucket = { tokens: 0, at: 0 };
    this._watchdog = null;
    this._stopped = false;
    this._opening = false;       // an _open is waiting for its token
    this._askedSince = false;    // the current socket was opened with since
    this._noLast = false;        // the history cannot send the newest events: never ask
  }

  // ----------------------------------------------------------------- public

  connect() {
    this._stopped = false;
    this._open();
  }

  close() {
    this._stopped = true;
    this._clearTimers();
    this._ws?.close(1000, "bye");
    this._setState("closed");
  }

  /** Send text (or items) as one update; resolves with the stored event when echoed. */
  send(textOrItems, { clientMsgId = randomId() } = {}) {
    const items = typeof textOrItems === "string"
      ? [{ type: "message", text: textOrItems }] : textOrItems;
    return new Promise((resolve, reject) => {
      this.outbox.push({ clientMsgId, items, resolve, reject, sentAt: 0 });
      this._pump();
    });
  }

  // ----------------------------------------------------------------- connection

  async _open() {
    if (this._stopped || this._opening) return;   // one socket at a time: never two opens
    this._opening = true;
    this._setState("connecting");
    try {
      this.token = await this.getToken(false);
    } catch (err) {
      this._emit("error", { error: String(err) });
      return this._retry("back-off");
    } finally {
      this._opening = false;
    }
    if (this._stopped) return;
    this._detach("replaced");     // none is left by now; if one were, it would go first
    const query = new URLSearchParams({ refusals: "close", hello: "true", marks: "true",
                                        encoding: this.encoding });
    if (this.heartbeat) query.set("heartbeat", "true");
    if (this.lastEventId) query.set("since", this.lastEventId);
    else if (this.last > 0 && !this._noLast) query.set("last", String(this.last));
    const protocols = [this.encoding];
    if (this.token) protocols.push(`bearer.${this.token}`);
    const ws = new WebSocket(`${this.url}/v1/chats/${encodeURIComponent(this.chatId)}?${query}`,
                             protocols);
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._askedSince = query.has("since");
    this._sequence = -1;
    this._live = false;
    // every handler checks that its socket is still the current one: a replaced socket's
    // late events must not touch the new one's state (or open a third)
    ws.onopen = () => {
      if (ws !== this._ws) return;
      // not attempt = 0 here: a readable refusal opens too, then closes before any frame
      this._setState("open");
      this._emit("open", { extensions: ws.extensions, protocol: ws.protocol });
      this._scheduleRefresh();
      this._pet(10);
    };
    ws.onmessage = (m) => {
      if (ws === this._ws) this._onFrame(m.data);
    };
    ws.onclose = (e) => this._onClose(ws, e.code, e.reason);
  }

  /** Let the current socket go without hearing from it again (its handlers are detached);
   *  what it did not echo is sent again on the next one. */
  _detach(reason) {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    this._live = false;
    ws.onopen = ws.onmessage = ws.onclose = null;
    clearTimeout(this._watchdog);
    for (const entry of this.outbox) entry.sentAt = 0;
    if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) {
      ws.close(1000, reason);
    }
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._clearTimers();
    for (const entry of this.outbox) entry.sentAt = 0;   // not echoed: resend on the next socket
    let action = closeAction(code, reason);
    // an older server names since when its history refuses last: dropping since would ask
    // for last again, in a loop
    if (action === "drop-since" && !this._askedSince) action = "drop-last";
    if (action === "drop-last" && this._noLast) action = "give-up";   // asked for neither
    this._emit("close", { code, reason, action });
    if (this._stopped) return;
    if (action === "give-up") {
      this._setState("gave-up");
      for (const entry of this.outbox.splice(0)) entry.reject(new Error(`${code} ${reason}`));
      return;
    }
    if (action === "drop-since") {
      this._forget();
      this._emit("gap", { code, reason });
      return this._retry("now");
    }
    if (action === "drop-last") {   // the history cannot send the newest events: live only
      this._noLast = true;
      return this._retry("now");
    }
    if (action === "refresh") {
      return this.getToken(true).then(() => this._retry(code === 4401 && this.attempt > 2
        ? "back-off" : "now"), () => this._retry("back-off"));
    }
    if (action === "drop-message") {
      const bad = this.outbox.shift();
      bad?.reject(new Error(`${code} ${reason}`));
    }
    this._retry(action === "back-off" ? "back-off" : "reconnect");
  }

  _retry(how) {
    if (this._stopped) return;
    this._setState("waiting");
    this.attempt += 1;
    // full jitter: anywhere between 0 and the exponential cap (longer when told to back off)
    const cap = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** Math.min(this.attempt, 16)
      * (how === "back-off" ? 4 : 1));
    const delay = how === "now" && this.attempt <= 3 ? 0 : Math.random() * cap;
    this._later(delay, () => this._open());
  }

  _scheduleRefresh() {
    const exp = this.token ? tokenExpiry(this.token) : null;
    if (exp === null) return;
    const inMs = (exp - this.refreshBeforeS) * 1000 - Date.now();
    const ws = this._ws;
    // reconnect with a fresh token before the old one expires (the server would close 4001)
    this._later(Math.max(inMs, 1000), async () => {
      try {
        await this.getToken(true);
      } catch (err) {
        this._emit("error", { error: String(err) });
      }
      if (this._stopped || ws !== this._ws) return;   // closed or replaced meanwhile
      this._emit("refresh", {});
      this._detach("token refresh");   // its close is not ours to answer: one socket
      this.attempt = 0;
      this._retry("now");
    });
  }

  // ----------------------------------------------------------------- frames

  _decode(data) {
    if (typeof data === "string") return JSON.parse(data);
    return this.codec.decode(new Uint8Array(data));
  }

  _encode(frame) {
    return this.encoding === "msgpack" ? this.codec.encode(frame) : JSON.stringify(frame);
  }

  _onFrame(data) {
    let frame;
    try {
      frame = this._decode(data);
    } catch (err) {
      this._emit("error", { error: `undecodable frame: ${err}` });
      return;
    }
    this._pet();
    if (frame.socket_sequence !== this._sequence + 1) {   // a lost frame: resume with since
      this._emit("error", { error: `sequence gap at ${frame.socket_sequence}` });
      this._ws?.close(4000, "sequence gap");
      return;
    }
    this._sequence = frame.socket_sequence;
    if (frame.type === "hello") {
      this.limits = frame.rateLimit ?? DEFAULT_LIMITS;
      this._heartbeatS = frame.heartbeatInterval;
      this._bucket = { tokens: Math.floor(this.limits.burst / 2), at: performance.now() };
      this._pet();
      this._emit("hello", frame);
    } else if (frame.type === "replay_end") {
      this._live = true;
      this.attempt = 0;           // a socket that got this far was not refused
      this._emit("live", frame);
      this._pump();
    } else if (frame.type === "update") {
      this._onUpdate(frame);
    }
  }

  _onUpdate(frame) {
    const { socket_sequence, replayed, clientMsgId, ...event } = frame;
    if (clientMsgId !== undefined) {
      const i = this.outbox.findIndex((entry) => entry.clientMsgId === clientMsgId);
      if (i >= 0) this.outbox.splice(i, 1)[0].resolve(event);
      this._pump();
    }
    if (this.seen.has(event.eventId)) return;          // a duplicate (a retry's echo, a resend)
    this.seen.add(event.eventId);
    if (this.seen.size > 5000) this.seen.delete(this.seen.values().next().value);
    if (!this.lastEventId || event.eventId > this.lastEventId) {
      this.lastEventId = event.eventId;
      this.storage?.setItem(this.storageKey, event.eventId);
    }
    this._emit("update", { event, replayed: replayed === true, own: clientMsgId !== undefined });
  }

  _forget() {
    this.lastEventId = null;
    this.storage?.removeItem(this.storageKey);
  }

  // ----------------------------------------------------------------- outbox

  /** Send what the outbox holds, paced below the server's rate limit (half its burst, 80%
   *  of its rate), and never before the replay ended (the echo of a resend may be in it). */
  _pump() {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || !this._live) return;
    const now = performance.now();
    const rate = this.limits.perSecond * 0.8;
    const burst = Math.max(1, Math.floor(this.limits.burst / 2));
    this._bucket.tokens = Math.min(burst, this._bucket.tokens + ((now - this._bucket.at) / 1000) * rate);
    this._bucket.at = now;
    for (const entry of this.outbox) {
      if (entry.sentAt) continue;
      if (this._bucket.tokens < 1) {
        if (!this._pumpTimer) {
          this._pumpTimer = this._later(((1 - this._bucket.tokens) / rate) * 1000, () => {
            this._pumpTimer = null;
            this._pump();
          });
        }
        return;
      }
      this._bucket.tokens -= 1;
      entry.sentAt = now;
      ws.send(this._encode({ type: "update", clientMsgId: entry.clientMsgId, message: entry.items }));
    }
  }

  // ----------------------------------------------------------------- heartbeat watchdog

  _pet(seconds) {
    clearTimeout(this._watchdog);
    const s = seconds ?? (this._heartbeatS ? this._heartbeatS * 2.5 : null);
    if (!s) return;
    this._watchdog = setTimeout(() => {
      this._emit("error", { error: "heartbeat missed" });
      this._ws?.close(4000, "heartbeat missed");
      if (this._ws) this._onClose(this._ws, 1006, "heartbeat missed");
    }, s * 1000);
  }

  // ----------------------------------------------------------------- plumbing

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _clearTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._pumpTimer = null;
    clearTimeout(this._watchdog);
  }

  _setState(state) {
    this.state = state;
    this._emit("state", { state });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
