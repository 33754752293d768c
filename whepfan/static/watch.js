// /watch/{stream}: the WHEP player page.
import { describeConnection, watchConnection } from "./diagnosis.js";
import { endpointFor, errorText, fragmentParams, setStatus, streamFromPath } from "./page.js";
import { WhepPlayer } from "./whep.js";

const STATS_INTERVAL_MS = 1000;

const video = document.getElementById("video");
const form = document.getElementById("controls");
const endpointField = document.getElementById("endpoint");
const tokenField = document.getElementById("token");
const stopButton = document.getElementById("stop");
const statsLine = document.getElementById("stats");

const params = fragmentParams();
const stream = streamFromPath("watch") || params.get("stream") || "";
document.getElementById("stream-name").textContent = stream;
document.title = `${stream} · whepfan`;
endpointField.value = endpointFor("whep", stream);
tokenField.value = params.get("token") || "";

let player = null;
let statsTimer = null;
// Exposed for the browser console (and the project's browser tests).
window.whepfan = { get player() { return player; } };

function describe(s) {
  const parts = [];
  if (s.width) parts.push(`${s.width}x${s.height}`);
  parts.push(`${s.fps.toFixed(0)} fps`, `${s.bitrateKbps.toFixed(0)} kbit/s`);
  parts.push(`loss ${s.lossPercent.toFixed(1)}% (${s.packetsLost})`);
  parts.push(`playout delay ${s.playoutDelayMs.toFixed(0)} ms`);
  const codecs = [s.videoCodec, s.audioCodec].filter(Boolean).join("+");
  if (codecs) parts.push(codecs);
  return parts.join(" · ");
}

async function showStats() {
  if (!player) return;
  try {
    statsLine.textContent = describe(await player.stats());
  } catch (_) {
    statsLine.textContent = "";
  }
}

async function play({ userGesture }) {
  await stop();
  setStatus("connecting…", "connecting");
  const current = new WhepPlayer({ endpoint: endpointField.value, token: tokenField.value });
  player = current;
  try {
    video.srcObject = await current.start();
  } catch (error) {
    if (player === current) player = null;
    setStatus(errorText(error), "error");
    return;
  }
  current.pc.addEventListener("connectionstatechange", async () => {
    if (player !== current) return;
    const state = current.pc.connectionState;
    if (state === "connected") setStatus("playing", "playing");
    else if (state === "failed") {
      const tried = await describeConnection(current.pc);
      if (player === current) setStatus(`connection failed: ${tried}`, "error");
    } else if (state === "disconnected") setStatus("connection interrupted…", "connecting");
  });
  watchConnection(current.pc, (text) => {
    if (player === current) setStatus(text, "connecting");
  });
  // Browsers refuse to autoplay sound without a user gesture; start muted then (the
  // video controls unmute).
  video.muted = !userGesture;
  try {
    await video.play();
  } catch (_) {
    video.muted = true;
    await video.play().catch(() => {});
  }
  statsTimer = setInterval(showStats, STATS_INTERVAL_MS);
}

async function stop() {
  clearInterval(statsTimer);
  statsTimer = null;
  const current = player;
  player = null;
  if (!current) return;
  video.srcObject = null;
  statsLine.textContent = "";
  try {
    await current.stop();
    setStatus("stopped", "stopped");
  } catch (error) {
    setStatus(`stopped (${errorText(error)})`, "stopped");
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  play({ userGesture: true });
});
stopButton.addEventListener("click", () => stop());
// Leaving the page ends the session at once instead of waiting for consent to expire
// (RFC 7675 §5.1: 30 s); keepalive lets the DELETE outlive the page.
window.addEventListener("pagehide", () => {
  if (player) player.stop({ keepalive: true });
  player = null;
});

if (params.get("autoplay") !== "0" && stream) play({ userGesture: false });
else setStatus("stopped", "stopped");
