"""The server-sent events extension (EXT §4) as a browser player meets it: the medooze
``WHEPClient`` reads the Link of the WHEP 201, POSTs the advertised event names and opens
an ``EventSource`` on the Location it gets back. Chromium's EventSource then hears, in
order: ``active`` (the publisher is live), ``viewercount`` as other viewers join and
leave, ``layers`` with the measured figures of a three-layer simulcast publisher, and
``inactive`` when the publisher leaves.

whep.js listens with ``eventSource.onmessage``, which never fires for named events
(WHATWG HTML §9.2.6: ``message`` is only the event type of frames without ``event:``),
so the page adds its own listeners. It does so in the EventSource constructor (a
subclass installed before ``view()``), because whep.js creates the EventSource in a
``fetch().then`` that may run before or after ``view()`` returns: attaching afterwards
could miss the first events. The test checks that the recorded EventSource is the one
whep.js keeps as ``client.eventSource``.

The environment (namespace, server, browser) is described in _harness.py.
"""

from __future__ import annotations

from typing import Any

from _harness import MEDOOZE_VIEW, VIEW_TOKEN
from test_simulcast_browser import publish_simulcast

EVENTS_REL = "urn:ietf:params:whep:ext:core:server-sent-events"
EVENT_TYPES = ["active", "inactive", "layers", "viewercount", "reconnect"]
EVENT_TIMEOUT_MS = 10_000  # viewercount: at most 1/s; layers: every 5 s while they change
STREAM = "events"

RECORD_EVENT_SOURCES = """(types) => {
  window.sseEvents = [];
  window.sseSources = [];
  const NativeEventSource = window.EventSource;
  window.EventSource = class extends NativeEventSource {
    constructor(url, init) {
      super(url, init);
      window.sseSources.push({ source: this, url: String(url) });
      for (const type of types) {
        this.addEventListener(type, (event) => {
          window.sseEvents.push({ type, data: JSON.parse(event.data) });
        });
      }
    }
  };
}"""

# Another viewer joins (a medooze client in a page of its own) or leaves (stop():
# the peer connection closes, then DELETE).
JOIN = """async ({endpoint, token}) => {
  const { WHEPClient } = await import("/medooze/whep.js");
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers: [] });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addTransceiver("video", { direction: "recvonly" });
  const client = new WHEPClient();
  await client.view(pc, endpoint, token);
  (window.others = window.others || []).push(client);
}"""

LEAVE = "async () => { await window.others.pop().stop(); }"


def _events(page: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = page.evaluate("() => window.sseEvents")
    return events


def _wait_for_event(page: Any, predicate: str, after: int = 0) -> int:
    """The index of the first recorded event from ``after`` on that satisfies the JS
    ``predicate`` (an arrow function of the event), once there is one."""
    found = page.wait_for_function(
        f"""([after]) => {{
          const matches = {predicate};
          const index = window.sseEvents.findIndex((event, i) => i >= after && matches(event));
          return index >= 0 ? {{ index }} : null;
        }}""",
        arg=[after],
        timeout=EVENT_TIMEOUT_MS,
        polling=50,
    )
    index: int = found.json_value()["index"]
    return index


def _viewercount_is(count: int) -> str:
    return f"(event) => event.type === 'viewercount' && event.data.viewercount === {count}"


# EXT §4.3.3: keyed by m-line index, each layer with measured figures.
MEASURED_LAYERS = """(event) => event.type === 'layers'
  && Object.values(event.data).some((layers) => layers.length === 3
    && layers.every((layer) => layer.rid && layer.bitrate > 0 && layer.width > 0
                               && layer.height > 0 && Number.isInteger(layer.spatialLayerId)
                               && Number.isInteger(layer.temporalLayerId)))"""


def test_event_source_hears_active_viewercount_layers_inactive_in_order(
    server: str, context: Any
) -> None:
    publisher = context.new_page()
    widths = publish_simulcast(publisher, server, STREAM, "VP8")
    endpoint = f"{server}/whep/{STREAM}"

    listener = context.new_page()
    listener.goto(f"{server}/")
    listener.evaluate(RECORD_EVENT_SOURCES, EVENT_TYPES)
    with listener.expect_response(lambda r: r.request.method == "POST" and "whep" in r.url) as post:
        listener.evaluate(MEDOOZE_VIEW, {"endpoint": endpoint, "token": VIEW_TOKEN})
    link = post.value.headers.get("link", "")
    assert EVENTS_REL in link and f'events="{",".join(EVENT_TYPES)}"' in link, link
    active = _wait_for_event(listener, "(event) => event.type === 'active'")
    # The EventSource whep.js opened is the one recorded, on the event stream's Location.
    assert listener.evaluate(
        "() => window.sseSources.length === 1"
        " && window.viewer.client.eventSource === window.sseSources[0].source"
    )
    source_url = listener.evaluate("() => window.sseSources[0].url")
    assert source_url.startswith(f"{server}/whep/{STREAM}/"), source_url

    # Two more viewers join one after the other, then leave: 1 -> 2 -> 3 -> 2 -> 1.
    others = context.new_page()
    others.goto(f"{server}/")
    mark = _wait_for_event(listener, _viewercount_is(1))
    for step in ("join", "join", "leave", "leave"):
        count = _events(listener)[mark]["data"]["viewercount"]
        if step == "join":
            others.evaluate(JOIN, {"endpoint": endpoint, "token": VIEW_TOKEN})
            count += 1
        else:
            others.evaluate(LEAVE)
            count -= 1
        mark = _wait_for_event(listener, _viewercount_is(count), after=mark + 1)

    # The publisher's layers, measured, after those changes (they are re-sent while the
    # measured figures change, EXT §4.3.3).
    layers_at = _wait_for_event(listener, MEASURED_LAYERS, after=mark + 1)
    layers = next(v for v in _events(listener)[layers_at]["data"].values() if len(v) == 3)
    assert {layer["rid"]: layer["width"] for layer in layers} == widths, layers

    publisher.evaluate("() => window.publisher.client.stop()")
    inactive = _wait_for_event(listener, "(event) => event.type === 'inactive'", after=layers_at)

    events = _events(listener)
    types = [event["type"] for event in events]
    shown = [(event["type"], event["data"]) for event in events]
    assert active == 0, shown  # EXT §4.3.1: nothing before it (and no initial inactive)
    assert types.count("active") == 1 and types.count("inactive") == 1, shown
    assert types[inactive + 1 :] == [], shown  # nothing after the publisher left
    counts = [event["data"]["viewercount"] for event in events if event["type"] == "viewercount"]
    assert counts == [1, 2, 3, 2, 1], shown
    assert active < types.index("viewercount") and mark < layers_at < inactive, shown
    print(f"\nevents heard by Chromium's EventSource: {' '.join(types)}")
    listener.evaluate("() => window.viewer.client.stop()")
