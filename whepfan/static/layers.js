// The /watch page's layer picker: the WHEP layer extension (EXT §5) at the session URL
// + "/layer". "auto" DELETEs the choice (back to the server's automatic layer); a rid
// POSTs {"rid": ...}. Hidden unless the stream has two or more layers.
const picker = document.getElementById("layer-picker");
const select = document.getElementById("layer");
const LAYER_REFRESH_MS = 2000;

async function layerRequest(method, body) {
  const player = window.whepfan && window.whepfan.player;
  const sessionUrl = player && player.session && player.sessionUrl;
  if (!sessionUrl) return null;
  const headers = { "Content-Type": "application/json" };
  const token = document.getElementById("token").value;
  if (token) headers.Authorization = `Bearer ${token}`;
  const url = new URL(`${sessionUrl}/layer`, location.href);
  const response = await fetch(url, { method, headers, body });
  return response.ok ? response.json() : null;
}

function show(state) {
  const rids = state.layers.map((layer) => layer.rid).filter(Boolean);
  picker.hidden = rids.length < 2;
  const known = [...select.options].slice(1).map((option) => option.value);
  if (known.join() !== rids.join()) {
    select.length = 1;
    for (const layer of state.layers) {
      if (!layer.rid) continue;
      const size = layer.width ? ` (${layer.width}x${layer.height})` : "";
      select.add(new Option(`${layer.rid}${size}`, layer.rid));
    }
  }
  select.value = state.automatic ? "" : state.pendingRid || state.rid || "";
}

async function refresh() {
  try {
    const state = await layerRequest("GET");
    if (state) show(state);
    else picker.hidden = true;
  } catch (_) {
    picker.hidden = true;
  }
}

select.addEventListener("change", async () => {
  const state = select.value
    ? await layerRequest("POST", JSON.stringify({ rid: select.value }))
    : await layerRequest("DELETE");
  if (state) show(state);
});
setInterval(refresh, LAYER_REFRESH_MS);
