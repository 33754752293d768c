// /: the streams this server knows, with links to watch and publish them.
import { errorText, fragmentParams, setStatus } from "./page.js";
import { authorization } from "./session.js";

const REFRESH_MS = 3000;

const list = document.getElementById("streams");
const form = document.getElementById("new-stream");
const tokenField = document.getElementById("token");
tokenField.value = fragmentParams().get("token") || "";

function withToken(path) {
  // The view token rides along in the fragment, as everywhere else.
  const token = tokenField.value;
  return token ? `${path}#${new URLSearchParams({ token })}` : path;
}

function render(streams) {
  list.replaceChildren();
  const live = streams.filter((stream) => stream.live);
  if (!live.length) {
    const empty = document.createElement("li");
    empty.textContent = "no live streams";
    list.append(empty);
    return;
  }
  for (const stream of live) {
    const item = document.createElement("li");
    const watch = document.createElement("a");
    const name = encodeURIComponent(stream.name);
    watch.href = withToken(`/watch/${name}`);
    watch.textContent = stream.name;
    const publish = document.createElement("a");
    publish.href = `/publish/${name}`;
    publish.textContent = "publish";
    publish.className = "secondary";
    item.append(watch, " ", publish);
    if (typeof stream.viewers === "number") {
      item.append(` · ${stream.viewers} watching`);
    }
    list.append(item);
  }
}

async function refresh() {
  try {
    const response = await fetch("/api/streams", { headers: authorization(tokenField.value) });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const listing = await response.json();
    render(listing.streams);
    setStatus(`${listing.viewers} viewer${listing.viewers === 1 ? "" : "s"} in all`, "ready");
  } catch (error) {
    setStatus(`cannot list streams: ${errorText(error)}`, "error");
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = document.getElementById("stream").value.trim();
  if (name) location.href = `/publish/${encodeURIComponent(name)}`;
});
tokenField.addEventListener("change", refresh);
refresh();
setInterval(refresh, REFRESH_MS);
