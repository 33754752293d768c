// Summaries of RTCPeerConnection.getStats() (W3C webrtc-stats) for the stats lines:
// totals come straight from the reports, rates from the difference between two samples.

function codecName(report, codecId) {
  const codec = codecId ? report.get(codecId) : null;
  return codec ? codec.mimeType.split("/")[1] : "";
}

/** Receive-side figures of a player's peer connection. */
export class InboundStats {
  constructor(pc) {
    this.pc = pc;
    this._previous = null;
  }

  async sample() {
    const report = await this.pc.getStats();
    const now = { at: performance.now(), bytes: 0, jitterDelay: 0, emitted: 0 };
    const summary = {
      width: 0,
      height: 0,
      fps: 0,
      framesDecoded: 0,
      videoCodec: "",
      videoPackets: 0,
      audioPackets: 0,
      audioSamples: 0,
      audioCodec: "",
      packetsLost: 0,
      lossPercent: 0,
      bitrateKbps: 0,
      playoutDelayMs: 0,
    };
    for (const stats of report.values()) {
      if (stats.type !== "inbound-rtp") continue;
      now.bytes += stats.bytesReceived || 0;
      summary.packetsLost += Math.max(0, stats.packetsLost || 0);
      if (stats.kind === "video") {
        summary.width = stats.frameWidth || 0;
        summary.height = stats.frameHeight || 0;
        summary.fps = stats.framesPerSecond || 0;
        summary.framesDecoded = stats.framesDecoded || 0;
        summary.videoPackets = stats.packetsReceived || 0;
        summary.videoCodec = codecName(report, stats.codecId);
        // webrtc-stats §8.6: jitterBufferDelay / jitterBufferEmittedCount is the mean
        // time a frame waited in the jitter buffer before playout.
        now.jitterDelay = stats.jitterBufferDelay || 0;
        now.emitted = stats.jitterBufferEmittedCount || 0;
      } else if (stats.kind === "audio") {
        summary.audioPackets = stats.packetsReceived || 0;
        summary.audioSamples = stats.totalSamplesReceived || 0;
        summary.audioCodec = codecName(report, stats.codecId);
      }
    }
    const received = summary.videoPackets + summary.audioPackets;
    if (received + summary.packetsLost > 0) {
      summary.lossPercent = (100 * summary.packetsLost) / (received + summary.packetsLost);
    }
    const previous = this._previous;
    if (previous && now.at > previous.at) {
      summary.bitrateKbps = (8 * (now.bytes - previous.bytes)) / (now.at - previous.at);
      const emitted = now.emitted - previous.emitted;
      if (emitted > 0) {
        summary.playoutDelayMs = (1000 * (now.jitterDelay - previous.jitterDelay)) / emitted;
      }
    } else if (now.emitted > 0) {
      summary.playoutDelayMs = (1000 * now.jitterDelay) / now.emitted;
    }
    this._previous = now;
    return summary;
  }
}

/** Send-side figures of a publisher's peer connection (one entry per simulcast layer). */
export class OutboundStats {
  constructor(pc) {
    this.pc = pc;
    this._previous = null;
  }

  async sample() {
    const report = await this.pc.getStats();
    const now = { at: performance.now(), bytes: 0 };
    const summary = { layers: [], audioPackets: 0, videoCodec: "", bitrateKbps: 0 };
    for (const stats of report.values()) {
      if (stats.type !== "outbound-rtp") continue;
      now.bytes += stats.bytesSent || 0;
      if (stats.kind === "video") {
        summary.videoCodec = codecName(report, stats.codecId) || summary.videoCodec;
        summary.layers.push({
          rid: stats.rid || "",
          width: stats.frameWidth || 0,
          height: stats.frameHeight || 0,
          fps: stats.framesPerSecond || 0,
          framesEncoded: stats.framesEncoded || 0,
        });
      } else if (stats.kind === "audio") {
        summary.audioPackets = stats.packetsSent || 0;
      }
    }
    summary.layers.sort((a, b) => a.width - b.width);
    const previous = this._previous;
    if (previous && now.at > previous.at) {
      summary.bitrateKbps = (8 * (now.bytes - previous.bytes)) / (now.at - previous.at);
    }
    this._previous = now;
    return summary;
  }
}
