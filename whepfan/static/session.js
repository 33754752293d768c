// The HTTP half of a WHIP (RFC 9725) or WHEP (draft-ietf-wish-whep-03) session, shared by
// whip.js and whep.js: POST the offer, apply the answer (or answer a WHEP 406
// counter-offer), trickle our candidates by PATCH (RFC 8840), DELETE at the end.

const SDP = "application/sdp";
const SDPFRAG = "application/trickle-ice-sdpfrag";

/** A request the server refused; `status` is the HTTP status, `detail` its reason. */
export class SignallingError extends Error {
  constructor(message, { status = 0, detail = "", retryAfter = null } = {}) {
    super(message);
    this.name = "SignallingError";
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

/** The token travels only in Authorization (RFC 6750 §2.1), never in the URL. */
export function authorization(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function refusal(response, action) {
  // RFC 9457 problem details, when the server sends them, say what was wrong.
  let detail = "";
  try {
    const type = response.headers.get("Content-Type") || "";
    if (type.includes("json")) {
      const problem = await response.json();
      detail = problem.detail || problem.title || "";
    } else {
      detail = (await response.text()).slice(0, 200);
    }
  } catch (_) {
    detail = "";
  }
  const retryAfter = response.headers.get("Retry-After");
  const reason = detail ? `: ${detail}` : "";
  return new SignallingError(`${action} failed with HTTP ${response.status}${reason}`, {
    status: response.status,
    detail,
    retryAfter,
  });
}

/**
 * `Link` header values (RFC 8288 §3) as {url, rel, params}; several Link fields reach
 * fetch() joined by commas, so split only at a comma that starts a new `<uri>`.
 */
export function parseLinks(header, base) {
  const links = [];
  if (!header) return links;
  for (const value of header.split(/,\s*(?=<)/)) {
    const target = value.match(/^\s*<([^>]*)>/);
    if (!target) continue;
    const params = {};
    const paramPattern = /;\s*([A-Za-z0-9!#$&+.^_`|~-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;,]*))?/g;
    for (const match of value.slice(target[0].length).matchAll(paramPattern)) {
      let param = (match[2] || "").trim();
      if (param.startsWith('"')) param = param.slice(1, -1).replace(/\\(.)/g, "$1");
      params[match[1].toLowerCase()] = param;
    }
    let url = target[1];
    try {
      // stun:/turn: URIs are not hierarchical: keep them as written.
      if (/^https?:|^\/|^\./.test(url) || !/^[a-z][a-z0-9+.-]*:/i.test(url)) {
        url = new URL(url, base).href;
      }
    } catch (_) {
      continue;
    }
    links.push({ url, rel: params.rel || "", params });
  }
  return links;
}

/** RTCIceServer entries from `Link: <turn:...>; rel="ice-server"` (RFC 9725 §4.6). */
export function iceServersFromLinks(links) {
  return links
    .filter((link) => link.rel.split(/\s+/).includes("ice-server"))
    .map((link) => {
      const server = { urls: link.url };
      if (link.params.username) server.username = link.params.username;
      if (link.params.credential) server.credential = link.params.credential;
      return server;
    });
}

function iceCredentials(sdp) {
  const ufrag = sdp.match(/^a=ice-ufrag:(.+?)\r?$/m);
  const pwd = sdp.match(/^a=ice-pwd:(.+?)\r?$/m);
  return { ufrag: ufrag ? ufrag[1] : "", pwd: pwd ? pwd[1] : "" };
}

/**
 * The body of a trickle PATCH (RFC 8840 §4.4, WHEP draft-03 §4.4.2): session-level ICE
 * credentials, then one media section per mid with its candidates.
 */
export function trickleFragment({ ufrag, pwd, media, ended }) {
  const lines = [`a=ice-ufrag:${ufrag}`, `a=ice-pwd:${pwd}`];
  for (const { mid, kind, candidates } of media) {
    lines.push(`m=${kind} 9 UDP/TLS/RTP/SAVPF 0`, `a=mid:${mid}`);
    for (const candidate of candidates) lines.push(`a=${candidate}`);
    if (ended) lines.push("a=end-of-candidates");
  }
  return lines.join("\r\n") + "\r\n";
}

/**
 * One WHIP or WHEP session. `connect(pc)` needs a peer connection whose transceivers
 * are set up; it resolves once the answer is applied (ICE and DTLS then proceed).
 */
export class HttpSession {
  constructor({ endpoint, token = "", acceptCounterOffer = false }) {
    this.endpoint = new URL(endpoint, document.baseURI).href;
    this.token = token;
    this.acceptCounterOffer = acceptCounterOffer;
    this.location = null;
    this.etag = null;
    this.links = [];
    this.postedAt = null; // performance.now() when the offer was sent
    this.answeredAt = null;
    this._pc = null;
    this._pending = [];
    this._gatheringDone = false;
    this._trickling = true;
    this._flushTimer = null;
  }

  /**
   * The STUN/TURN servers the server offers, from `Link: rel="ice-server"` on an OPTIONS
   * response (RFC 9725 §4.6), as RTCIceServer entries; [] if it offers none or the request
   * fails. For a peer connection yet to be made: it gathers with the servers it has when
   * setLocalDescription runs, and servers set after that only count from an ICE restart.
   */
  async iceServers() {
    try {
      const response = await fetch(this.endpoint, {
        method: "OPTIONS",
        headers: authorization(this.token),
      });
      if (!response.ok) return [];
      return iceServersFromLinks(parseLinks(response.headers.get("Link"), this.endpoint));
    } catch (_) {
      return [];
    }
  }

  async connect(pc) {
    this._pc = pc;
    pc.addEventListener("icecandidate", (event) => this._queueCandidate(event.candidate));
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    // The offer goes out at once, without waiting for ICE gathering: candidates follow
    // by PATCH (RFC 8840), and an ICE-lite server learns our address from our checks.
    this.postedAt = performance.now();
    const response = await fetch(this.endpoint, {
      method: "POST",
      headers: { "Content-Type": SDP, ...authorization(this.token) },
      body: pc.localDescription.sdp,
    });
    if (response.status === 201) {
      this._adopt(response);
      const answer = await response.text();
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
    } else if (response.status === 406 && this.acceptCounterOffer && this._isSdp(response)) {
      await this._answerCounterOffer(pc, response);
    } else {
      throw await refusal(response, "POST offer");
    }
    this.answeredAt = performance.now();
    const iceServers = iceServersFromLinks(this.links);
    const config = pc.getConfiguration();
    if (iceServers.length && !(config.iceServers || []).length) {
      pc.setConfiguration({ ...config, iceServers });
    }
    this._scheduleFlush();
  }

  _isSdp(response) {
    return (response.headers.get("Content-Type") || "").split(";")[0].trim() === SDP;
  }

  _adopt(response) {
    const location = response.headers.get("Location");
    if (!location) throw new SignallingError("the server sent no Location for the session");
    // Relative to the URL the answer came from (RFC 9110 §10.2.2, RFC 3986 §5.1.3): after
    // a redirect (a cluster's 307 placement) the session is not where we first POSTed.
    const base = response.url || this.endpoint;
    this.location = new URL(location, base).href;
    this.etag = response.headers.get("ETag");
    this.links = parseLinks(response.headers.get("Link"), base);
  }

  async _answerCounterOffer(pc, response) {
    // WHEP draft-03 §4.2.2: the server could not use our offer and made its own; we
    // answer it on the session URL it gave.
    this._adopt(response);
    const counterOffer = await response.text();
    await pc.setLocalDescription({ type: "rollback" });
    this._pending = [];
    this._gatheringDone = false;
    await pc.setRemoteDescription({ type: "offer", sdp: counterOffer });
    await pc.setLocalDescription(await pc.createAnswer());
    const patched = await fetch(this.location, {
      method: "PATCH",
      headers: this._patchHeaders(SDP),
      body: pc.localDescription.sdp,
    });
    if (!patched.ok) throw await refusal(patched, "PATCH answer");
  }

  _patchHeaders(contentType) {
    const headers = { "Content-Type": contentType, ...authorization(this.token) };
    if (this.etag) headers["If-Match"] = this.etag;
    return headers;
  }

  _queueCandidate(candidate) {
    if (candidate === null || candidate.candidate === "") {
      this._gatheringDone = true;
    } else {
      this._pending.push(candidate);
    }
    this._scheduleFlush();
  }

  _scheduleFlush() {
    // Candidates that arrive together go in one PATCH.
    if (!this.location || !this._trickling || this._flushTimer !== null) return;
    if (!this._pending.length && !this._gatheringDone) return;
    this._flushTimer = setTimeout(() => {
      this._flushTimer = null;
      this._flush().catch((error) => console.warn("whepfan: trickle failed:", error));
    }, 0);
  }

  async _flush() {
    const pc = this._pc;
    if (!pc || pc.signalingState === "closed" || !pc.localDescription) return;
    const candidates = this._pending;
    const ended = this._gatheringDone;
    this._pending = [];
    if (ended) this._trickling = false; // end-of-candidates sent: nothing more follows
    // With max-bundle every candidate belongs to the first (bundle-tag) media section.
    const first = pc.getTransceivers().find((transceiver) => transceiver.mid !== null);
    if (!first) return;
    const media = [
      {
        mid: first.mid,
        kind: first.receiver.track.kind,
        candidates: candidates.map((candidate) => candidate.candidate),
      },
    ];
    const response = await fetch(this.location, {
      method: "PATCH",
      headers: this._patchHeaders(SDPFRAG),
      body: trickleFragment({ ...iceCredentials(pc.localDescription.sdp), media, ended }),
    });
    if (response.status === 405 || response.status === 501) {
      // The server does not take trickled candidates (WHEP draft-03 §4.4.2): stop.
      this._trickling = false;
    } else if (!response.ok) {
      throw await refusal(response, "PATCH candidates");
    }
  }

  /** DELETE the session (WHEP draft-03 §4.3); `keepalive` lets it outlive the page. */
  async close({ keepalive = false } = {}) {
    this._trickling = false;
    const location = this.location;
    this.location = null;
    if (!location) return null;
    const response = await fetch(location, {
      method: "DELETE",
      headers: authorization(this.token),
      keepalive,
    });
    return response.status;
  }
}
