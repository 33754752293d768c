// In-page checks the browser tests run (added to every page as an init script).
// Each takes an RTCPeerConnection and reads its getStats() (W3C webrtc-stats).
window.__checks = {
  async summary(pc) {
    const report = await pc.getStats();
    const out = {
      connectionState: pc.connectionState,
      framesDecoded: 0,
      frameWidth: 0,
      frameHeight: 0,
      videoCodec: "",
      audioPackets: 0,
      audioSamples: 0,
      audioCodec: "",
    };
    const codec = (id) => (id && report.get(id) ? report.get(id).mimeType : "");
    for (const stats of report.values()) {
      if (stats.type !== "inbound-rtp") continue;
      if (stats.kind === "video") {
        out.framesDecoded = stats.framesDecoded || 0;
        out.frameWidth = stats.frameWidth || 0;
        out.frameHeight = stats.frameHeight || 0;
        out.videoCodec = codec(stats.codecId);
      } else if (stats.kind === "audio") {
        out.audioPackets = stats.packetsReceived || 0;
        out.audioSamples = stats.totalSamplesReceived || 0;
        out.audioCodec = codec(stats.codecId);
      }
    }
    return out;
  },

  // Poll until at least `frames` video frames decoded and audio samples arrived.
  async waitForMedia(pc, { frames = 30, timeoutMs = 20000 } = {}) {
    const started = performance.now();
    for (;;) {
      const summary = await this.summary(pc);
      const done = summary.framesDecoded >= frames && summary.audioSamples > 0;
      if (done || performance.now() - started > timeoutMs) return summary;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  },

  // Milliseconds from `since` (a performance.now() value) to the first decoded frame.
  async firstFrameDelay(pc, since, { timeoutMs = 20000 } = {}) {
    for (;;) {
      const summary = await this.summary(pc);
      const now = performance.now();
      if (summary.framesDecoded > 0) return now - since;
      if (now - since > timeoutMs) return null;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  },

  async outboundCodec(pc) {
    const report = await pc.getStats();
    for (const stats of report.values()) {
      if (stats.type === "outbound-rtp" && stats.kind === "video" && stats.codecId) {
        const codec = report.get(stats.codecId);
        if (codec) return codec.mimeType;
      }
    }
    return "";
  },

  // The inbound video figures the layer-switch tests follow, or null before there is an
  // inbound video stream (W3C webrtc-stats RTCInboundRtpStreamStats).
  async video(pc) {
    const report = await pc.getStats();
    for (const stats of report.values()) {
      if (stats.type !== "inbound-rtp" || stats.kind !== "video") continue;
      return {
        framesDecoded: stats.framesDecoded || 0,
        keyFramesDecoded: stats.keyFramesDecoded || 0,
        frameWidth: stats.frameWidth || 0,
        frameHeight: stats.frameHeight || 0,
        framesDropped: stats.framesDropped || 0,
        pliCount: stats.pliCount || 0,
        nackCount: stats.nackCount || 0,
        packetsLost: stats.packetsLost || 0,
        freezeCount: stats.freezeCount || 0,
        totalFreezesDuration: stats.totalFreezesDuration || 0,
      };
    }
    return null;
  },

  // Poll video(pc) until `done(figures)` holds; returns the figures and the time taken
  // (`reached` false on timeout, with the last figures seen).
  async waitForVideo(pc, done, { timeoutMs = 5000, pollMs = 20 } = {}) {
    const started = performance.now();
    for (;;) {
      const figures = await this.video(pc);
      const elapsedMs = performance.now() - started;
      if (figures && done(figures)) return { reached: true, elapsedMs, figures };
      if (elapsedMs > timeoutMs) return { reached: false, elapsedMs, figures };
      await new Promise((resolve) => setTimeout(resolve, pollMs));
    }
  },

  // What a simulcast sender puts out, per rid (for diagnostics when a layer is missing).
  async outboundLayers(pc) {
    const report = await pc.getStats();
    const layers = [];
    for (const stats of report.values()) {
      if (stats.type !== "outbound-rtp" || stats.kind !== "video") continue;
      layers.push({
        rid: stats.rid || "",
        frameWidth: stats.frameWidth || 0,
        frameHeight: stats.frameHeight || 0,
        framesEncoded: stats.framesEncoded || 0,
        bytesSent: stats.bytesSent || 0,
        targetBitrate: stats.targetBitrate || 0,
        active: stats.active,
        qualityLimitationReason: stats.qualityLimitationReason || "",
      });
    }
    return layers;
  },
};
