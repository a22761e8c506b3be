// One WebSocket to the daemon, reopened with exponential backoff and jitter.
// The daemon replays its sticky state on every (re)connect, so `onOpen` lets the deck
// start from a clean slate and repaint from what follows.
const BASE_MS = 500;
const MAX_MS = 15000;

export function backoffMs(attempt, random = Math.random) {
  const cap = Math.min(MAX_MS, BASE_MS * 2 ** attempt);
  return cap / 2 + random() * (cap / 2); // "equal jitter": never zero, never in lock-step
}

export class Connection {
  constructor(url, { onOpen, onEvent, onStatus }) {
    Object.assign(this, { url, onOpen, onEvent, onStatus });
    this.attempt = 0;
    this.ws = null;
    this.retryAt = 0;
    this.timer = 0;
    this.ticker = 0;
    this.open();
  }

  open() {
    this.status("connecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.onOpen();
      this.status("connected");
    };
    ws.onmessage = (m) => {
      let data;
      try { data = JSON.parse(m.data); } catch { return; } // not JSON: not ours to draw
      for (const ev of Array.isArray(data) ? data : [data]) this.onEvent(ev);
    };
    ws.onclose = () => { if (this.ws === ws) this.retry(); };
  }

  retry() {
    const delay = backoffMs(this.attempt++);
    this.retryAt = performance.now() + delay;
    clearTimeout(this.timer);
    clearInterval(this.ticker);
    this.timer = setTimeout(() => { clearInterval(this.ticker); this.open(); }, delay);
    this.status("reconnecting");
    this.ticker = setInterval(() => this.status("reconnecting"), 250);
  }

  status(state) {
    const inS = state === "reconnecting" ? Math.max(0, Math.ceil((this.retryAt - performance.now()) / 1000)) : null;
    this.state = state;
    this.onStatus(state, inS);
  }

  // Tests use this to exercise the reconnect path without killing the daemon.
  drop() { this.ws?.close(); }
}
