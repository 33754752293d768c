// /publish/{stream}: camera and microphone over WHIP, optionally as three simulcast layers.
import { describeConnection, watchConnection } from "./diagnosis.js";
import { endpointFor, errorText, fragmentParams, setStatus, streamFromPath } from "./page.js";
import { WhipPublisher } from "./whip.js";

const STATS_INTERVAL_MS = 1000;

const preview = document.getElementById("preview");
const form = document.getElementById("controls");
const endpointField = document.getElementById("endpoint");
const tokenField = document.getElementById("token");
const codecField = document.getElementById("codec");
const simulcastField = document.getElementById("simulcast");
const stopButton = document.getElementById("stop");
const statsLine = document.getElementById("stats");
const watchLink = document.getElementById("watch-link");

const params = fragmentParams();
const stream = streamFromPath("publish") || params.get("stream") || "";
document.getElementById("stream-name").textContent = stream;
document.title = `publish ${stream} · whepfan`;
endpointField.value = endpointFor("whip", stream);
tokenField.value = params.get("token") || "";
codecField.value = (params.get("codec") || "").toUpperCase();
simulcastField.checked = params.get("simulcast") === "1";
watchLink.href = `/watch/${encodeURIComponent(stream)}`;
watchLink.textContent = watchLink.href;

let publisher = null;
let media = null;
let statsTimer = null;
window.whepfan = { get publisher() { return publisher; } };

function describe(s) {
  const layers = s.layers
    .filter((layer) => layer.width)
    .map((layer) => `${layer.rid ? layer.rid + " " : ""}${layer.width}x${layer.height}@${layer.fps.toFixed(0)}`);
  return [...layers, s.videoCodec, `${s.bitrateKbps.toFixed(0)} kbit/s`].filter(Boolean).join(" · ");
}

async function showStats() {
  if (!publisher) return;
  try {
    statsLine.textContent = describe(await publisher.stats());
  } catch (_) {
    statsLine.textContent = "";
  }
}

async function start() {
  await stop();
  setStatus("opening camera and microphone…", "connecting");
  const simulcast = simulcastField.checked;
  try {
    // Simulcast needs a picture large enough for three distinct layers.
    const video = simulcast ? { width: 1280, height: 720 } : true;
    media = await navigator.mediaDevices.getUserMedia({ video, audio: true });
  } catch (error) {
    setStatus(`no camera/microphone: ${errorText(error)}`, "error");
    return;
  }
  const captured = media;
  preview.srcObject = captured;
  const current = new WhipPublisher({ endpoint: endpointField.value, token: tokenField.value });
  publisher = current;
  setStatus("connecting…", "connecting");
  try {
    await current.start(captured, { videoCodec: codecField.value, simulcast });
  } catch (error) {
    // Refused (409 stream already live, 401, 503) or unreachable: nothing is being
    // published, so the camera and microphone go off instead of staying lit.
    if (publisher === current) publisher = null;
    release(captured);
    setStatus(errorText(error), "error");
    return;
  }
  current.pc.addEventListener("connectionstatechange", async () => {
    if (publisher !== current) return;
    const state = current.pc.connectionState;
    if (state === "connected") setStatus("live", "live");
    else if (state === "failed") {
      // ICE or DTLS gave up: say what was tried (before Stop closes the connection),
      // end the session and free the devices as Stop would.
      const tried = await describeConnection(current.pc);
      await stop();
      setStatus(`connection failed: ${tried}`, "error");
    } else if (state === "disconnected") setStatus("connection interrupted…", "connecting");
  });
  watchConnection(current.pc, (text) => {
    if (publisher === current) setStatus(text, "connecting");
  });
  statsTimer = setInterval(showStats, STATS_INTERVAL_MS);
}

/** Stop the capture tracks of `captured`; clear the preview if it is still shown. */
function release(captured) {
  for (const track of captured.getTracks()) track.stop();
  if (media === captured) {
    media = null;
    preview.srcObject = null;
  }
}

async function stop() {
  clearInterval(statsTimer);
  statsTimer = null;
  const current = publisher;
  publisher = null;
  if (media) release(media);
  statsLine.textContent = "";
  if (!current) return;
  try {
    await current.stop();
    setStatus("stopped", "stopped");
  } catch (error) {
    setStatus(`stopped (${errorText(error)})`, "stopped");
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
stopButton.addEventListener("click", () => stop());
window.addEventListener("pagehide", () => {
  if (publisher) publisher.stop({ keepalive: true });
  publisher = null;
});
setStatus("ready", "idle");
