// What the pages say when a peer connection does not come up: "connection failed" alone
// leaves the user guessing. The server's candidates from the answer, ours, the ICE and
// DTLS states, and what the connectivity checks of each pair got back.
//
//   const cancel = watchConnection(pc, (text) => setStatus(text, "connecting"));
//   ...
//   setStatus(`connection failed: ${await describeConnection(pc)}`, "error");

/** How long a page waits for "connected" before it says what it has tried. */
export const CONNECT_HINT_MS = 10_000;

/**
 * The component-1 candidates of an SDP (`a=candidate:<foundation> <component> <transport>
 * <priority> <address> <port> typ <type>`, RFC 8839 §5.1) as "udp 192.0.2.1:8189 host".
 */
export function answerCandidates(sdp) {
  const found = [];
  const pattern = /^a=candidate:\S+ (\d+) (\S+) \d+ (\S+) (\d+) typ (\S+)/gm;
  for (const [, component, transport, address, port, type] of (sdp || "").matchAll(pattern)) {
    if (component !== "1") continue;
    found.push(`${transport.toLowerCase()} ${hostPort(address, port)} ${type}`);
  }
  // Bundled m= sections repeat the same candidates (RFC 8843 §7.1.2): list each once.
  return [...new Set(found)];
}

function hostPort(address, port) {
  return address && address.includes(":") ? `[${address}]:${port}` : `${address}:${port}`;
}

/** One line: states, the answer's candidates, ours, and each candidate pair's checks. */
export async function describeConnection(pc) {
  const transport = [...pc.getSenders(), ...pc.getReceivers()]
    .map((endpoint) => endpoint.transport)
    .find(Boolean);
  const parts = [`ICE ${pc.iceConnectionState}, DTLS ${transport ? transport.state : "new"}`];
  const remote = answerCandidates(pc.remoteDescription && pc.remoteDescription.sdp);
  parts.push(`server candidates from the answer: ${remote.join(", ") || "none"}`);
  let stats = null;
  try {
    stats = await pc.getStats();
  } catch (_) {
    // A closed connection has no stats; the states and the answer still say enough.
  }
  if (stats) {
    const local = [];
    const pairs = [];
    stats.forEach((report) => {
      if (report.type === "local-candidate") {
        const where = hostPort(report.address || report.ip || "(hidden)", report.port);
        local.push(`${report.protocol} ${where} ${report.candidateType}`);
      } else if (report.type === "candidate-pair") {
        const to = stats.get(report.remoteCandidateId);
        const where = to ? hostPort(to.address || to.ip, to.port) : "?";
        // RFC 8445 §6.1.2.6 pair states; requests and responses count the checks.
        pairs.push(
          `${where} ${report.state}, ${report.requestsSent || 0} checks sent, ` +
            `${report.responsesReceived || 0} answered`,
        );
      }
    });
    parts.push(`our candidates: ${local.join(", ") || "none gathered"}`);
    if (pairs.length) parts.push(`checks: ${pairs.join("; ")}`);
  }
  return parts.join("; ");
}

/**
 * Call `onStall(text)` once if `pc` is not connected `ms` from now, with what it has
 * tried; returns a function that cancels the watch (also cancelled by "connected").
 */
export function watchConnection(pc, onStall, ms = CONNECT_HINT_MS) {
  let timer = null;
  const cancel = () => {
    clearTimeout(timer);
    pc.removeEventListener("connectionstatechange", onChange);
  };
  // "failed" has its own message (the page's connectionstatechange handler).
  const settled = () => ["connected", "failed", "closed"].includes(pc.connectionState);
  const onChange = () => {
    if (settled()) cancel();
  };
  pc.addEventListener("connectionstatechange", onChange);
  timer = setTimeout(async () => {
    cancel();
    if (settled()) return;
    onStall(`not connected after ${ms / 1000} s: ${await describeConnection(pc)}`);
  }, ms);
  return cancel;
}
