// A WHIP publisher (RFC 9725) on fetch() and RTCPeerConnection.
//
//   const media = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
//   const publisher = new WhipPublisher({ endpoint: "/whip/live", token });
//   await publisher.start(media, { videoCodec: "VP8", simulcast: false });
//   ...
//   await publisher.stop();   // DELETE on the session URL

import { HttpSession } from "./session.js";
import { OutboundStats } from "./stats.js";

export { SignallingError } from "./session.js";

// Three layers at quarter, half and full resolution, lowest first; whepfan's answer lists
// them as `a=rid:<id> recv` + `a=simulcast:recv q;h;f` (RFC 8853 §5.3).
export const SIMULCAST_LAYERS = [
  { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 200_000 },
  { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 700_000 },
  { rid: "f", maxBitrate: 2_500_000 },
];

/**
 * The browser's codecs for `kind` with `mimeSubtype` (e.g. "H264") first and every other
 * media codec removed, so the offer carries only that one; retransmission and FEC
 * entries (rtx, red, ulpfec) stay.
 */
export function codecPreferences(kind, mimeSubtype) {
  const wanted = `${kind}/${mimeSubtype}`.toLowerCase();
  const helpers = ["rtx", "red", "ulpfec", "flexfec-03"].map((name) => `${kind}/${name}`);
  const codecs = RTCRtpSender.getCapabilities(kind).codecs;
  const chosen = codecs.filter((codec) => codec.mimeType.toLowerCase() === wanted);
  if (!chosen.length) throw new Error(`this browser cannot send ${mimeSubtype}`);
  const rest = codecs.filter((codec) => helpers.includes(codec.mimeType.toLowerCase()));
  return [...chosen, ...rest];
}

export class WhipPublisher {
  constructor({ endpoint, token = "", iceServers = [] }) {
    this.session = new HttpSession({ endpoint, token });
    this.iceServers = iceServers;
    this.pc = null;
    this._stopped = false;
    this._stats = null;
  }

  /** Publish the tracks of `media`; `videoCodec` ("VP8", "H264", ...) narrows the offer. */
  async start(media, { videoCodec = "", simulcast = false } = {}) {
    if (this.pc) throw new Error("this publisher has already started");
    // As the player does (whep.js): the server's STUN/TURN servers unless given some.
    const iceServers = this.iceServers.length ? this.iceServers : await this.session.iceServers();
    if (this._stopped) throw new Error("this publisher was stopped while it started");
    const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers });
    this.pc = pc;
    // RFC 9725 §4.2: sendonly sections, audio and video at most one each.
    for (const track of media.getTracks()) {
      const init = { direction: "sendonly", streams: [media] };
      if (track.kind === "video" && simulcast) {
        init.sendEncodings = SIMULCAST_LAYERS.map((layer) => ({ ...layer }));
      }
      const transceiver = pc.addTransceiver(track, init);
      if (track.kind === "video" && videoCodec) {
        transceiver.setCodecPreferences(codecPreferences("video", videoCodec));
      }
    }
    this._stats = new OutboundStats(pc);
    try {
      await this.session.connect(pc);
    } catch (error) {
      pc.close();
      throw error;
    }
  }

  get sessionUrl() {
    return this.session.location;
  }

  async stats() {
    if (!this._stats) throw new Error("the publisher has not started");
    return this._stats.sample();
  }

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
