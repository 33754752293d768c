// A WHEP player (draft-ietf-wish-whep-03) on fetch() and RTCPeerConnection.
//
//   const player = new WhepPlayer({ endpoint: "/whep/live", token });
//   video.srcObject = await player.start();
//   ...
//   await player.stop();   // DELETE on the session URL

import { HttpSession } from "./session.js";
import { InboundStats } from "./stats.js";

export { SignallingError } from "./session.js";

export class WhepPlayer {
  constructor({ endpoint, token = "", iceServers = [], video = true, audio = true }) {
    this.session = new HttpSession({ endpoint, token, acceptCounterOffer: true });
    this.iceServers = iceServers;
    this.kinds = [...(video ? ["video"] : []), ...(audio ? ["audio"] : [])];
    this.pc = null;
    this._stopped = false;
    this.stream = null;
    this._stats = null;
  }

  /** Negotiate; resolves with the MediaStream the tracks arrive on. */
  async start() {
    if (this.pc) throw new Error("this player has already started");
    // WHEP players offer recvonly sections on one bundled transport (draft-03 §4.2).
    // Without servers of its own the player uses those the server offers (never a public
    // STUN server by surprise), asked for before the offer: a viewer whose network drops
    // UDP to the media port gets through only on the TURN server's relayed candidate.
    const iceServers = this.iceServers.length ? this.iceServers : await this.session.iceServers();
    if (this._stopped) throw new Error("this player was stopped while it started");
    const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers });
    this.pc = pc;
    this.stream = new MediaStream();
    pc.addEventListener("track", (event) => this.stream.addTrack(event.track));
    for (const kind of this.kinds) pc.addTransceiver(kind, { direction: "recvonly" });
    this._stats = new InboundStats(pc);
    try {
      await this.session.connect(pc);
    } catch (error) {
      pc.close();
      throw error;
    }
    return this.stream;
  }

  /** performance.now() when the offer was POSTed (for time-to-first-frame figures). */
  get postedAt() {
    return this.session.postedAt;
  }

  get sessionUrl() {
    return this.session.location;
  }

  async stats() {
    if (!this._stats) throw new Error("the player has not started");
    return this._stats.sample();
  }

  /** End the session: DELETE, then close the peer connection. Returns the DELETE status. */
  async stop({ keepalive = false } = {}) {
    this._stopped = true;
    let status = null;
    try {
      status = await this.session.close({ keepalive });
    } finally {
      if (this.pc) this.pc.close();
    }
    return status;
  }
}
