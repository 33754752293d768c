// What the three pages share: settings from the URL fragment, the stream name from the
// path, and the status line.
//
// Settings come from the fragment (`#token=...&endpoint=...`), never the query string: a
// fragment is not sent to the server, so it stays out of access logs, proxies and
// Referer headers (RFC 9110 §10.1.3), and whepfan never accepts a token from a query.

export function fragmentParams() {
  return new URLSearchParams(location.hash.replace(/^#/, ""));
}

/** The {stream} of /watch/{stream} or /publish/{stream}. */
export function streamFromPath(prefix) {
  const match = location.pathname.match(new RegExp(`/${prefix}/([^/]+)/?$`));
  return match ? decodeURIComponent(match[1]) : "";
}

/** The endpoint to use: the fragment's `endpoint`, else this server's own. */
export function endpointFor(protocol, stream) {
  const given = fragmentParams().get("endpoint");
  if (given) return given;
  return new URL(`/${protocol}/${encodeURIComponent(stream)}`, location.href).href;
}

/** Show `text`; `state` lands on <body data-state> for styling and automation. */
export function setStatus(text, state) {
  const status = document.getElementById("status");
  if (status) status.textContent = text;
  if (state) document.body.dataset.state = state;
}

export function errorText(error) {
  return error && error.message ? error.message : String(error);
}
