"""The dashboard page: one HTML document with its CSS and script inline.

Nothing is fetched from anywhere but ``api/status`` on the same listener (no
CDN, no font, no library: the graph is drawn on a ``<canvas>`` here), so it
works on an offline host, and ``CONTENT_SECURITY_POLICY`` allows exactly these
inline blocks (by hash) and that one endpoint. Text from peers (agent names,
destinations) is only ever set as ``textContent``. The layout is a grid of
tiles and tables that turn into stacked cards on a narrow screen.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE"]

_STYLE: Final = """
:root{--bg:#f6f7f9;--fg:#1c2330;--mute:#667085;--card:#fff;--line:#e3e6eb;
--out:#2563eb;--in:#059669;--bad:#dc2626}
@media (prefers-color-scheme:dark){:root{--bg:#11151c;--fg:#e6e9ef;--mute:#98a2b3;
--card:#1a2029;--line:#2b3340;--out:#60a5fa;--in:#34d399;--bad:#f87171}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
background:var(--bg);color:var(--fg)}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:baseline;padding:.8rem 1rem}
h1{font-size:1.25rem;margin:0}h2{font-size:1rem;margin:0 0 .6rem}
main{padding:0 1rem 1rem;display:grid;gap:1rem;max-width:1200px}
.mute{color:var(--mute)}
.pill{border-radius:1rem;padding:.05rem .6rem;font-size:.8rem;background:var(--line)}
.pill.live{background:var(--in);color:#fff}.pill.down{background:var(--bad);color:#fff}
.tiles{display:grid;gap:.6rem;grid-template-columns:repeat(auto-fit,minmax(140px,1fr))}
.tile,.card{background:var(--card);border:1px solid var(--line);border-radius:.6rem;
padding:.7rem .9rem}
.tile .v{font-size:1.4rem;font-weight:600;font-variant-numeric:tabular-nums}
.tile .k{font-size:.8rem;color:var(--mute)}
.out{color:var(--out)}.in{color:var(--in)}.bad{color:var(--bad)}
canvas{width:100%;height:200px;display:block}
.legend{font-size:.8rem;display:flex;gap:1rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line);
vertical-align:top}
th{font-size:.8rem;color:var(--mute);font-weight:500}
td small{display:block;color:var(--mute)}
.empty{color:var(--mute);font-style:italic}
footer{padding:0 1rem 1rem;font-size:.8rem}
a{color:var(--out)}
@media (max-width:640px){
 body{font-size:14px}
 table.cards thead{display:none}
 table.cards tr{display:block;border-bottom:1px solid var(--line);padding:.3rem 0}
 table.cards td{display:flex;justify-content:space-between;gap:1rem;border:0;
 padding:.15rem .2rem;text-align:right}
 table.cards td::before{content:attr(data-label);color:var(--mute);text-align:left}
 table.cards td small{text-align:right}
}
"""

_SCRIPT: Final = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
function bytes(n) {
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0) : String(Math.round(n))) + " " + UNITS[i];
}
const rate = (n) => bytes(n) + "/s";
function ago(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24,
        m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + m + "m";
  return m ? m + "m " + s + "s" : s + "s";
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
function setText(id, text, value) {
  const el = $(id);
  el.textContent = text;
  if (value !== undefined) el.dataset.value = String(value);
}
function cell(row, label, text, extra, cls) {
  const td = row.insertCell();
  td.dataset.label = label;
  const value = document.createElement("div"), span = document.createElement("span");
  span.textContent = text;
  if (cls) span.className = cls;
  value.appendChild(span);
  for (const line of [].concat(extra || [])) {
    const small = document.createElement("small");
    small.textContent = line;
    value.appendChild(small);
  }
  td.appendChild(value);
  return td;
}
function fill(id, rows, columns, empty) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const td = body.insertRow().insertCell();
    td.colSpan = columns.length;
    td.className = "empty";
    td.textContent = empty;
    return;
  }
  for (const item of rows) {
    const row = body.insertRow();
    for (const [label, get] of columns) {
      const got = get(item);
      Array.isArray(got) ? cell(row, label, ...got) : cell(row, label, got);
    }
    if (item.agent !== undefined) row.dataset.agent = item.agent || "-";
  }
}
const byForward = (forwards) => forwards.map((f) =>
  "forward " + f.forward + ": " + f.channels_open + " open, " + f.channels_total + " in all");

function render(doc) {
  const t = doc.totals;
  setText("role", doc.role + " " + doc.version);
  setText("meta", "pid " + doc.pid + " \u00b7 up " + ago(doc.now - doc.started_at));
  setText("t-sessions", String(t.sessions), t.sessions);
  setText("t-channels", String(t.channels_open), t.channels_open);
  setText("rate-out", rate(t.rate_out), t.rate_out);
  setText("rate-in", rate(t.rate_in), t.rate_in);
  setText("bytes-out", bytes(t.bytes_out) + " in all", t.bytes_out);
  setText("bytes-in", bytes(t.bytes_in) + " in all", t.bytes_in);
  setText("t-refusals", String(t.refusals), t.refusals);
  setText("t-reconnects", String(t.reconnects), t.reconnects);
  setText("t-sessions-total", t.sessions_total + " since start");
  setText("t-channels-total", t.channels_total + " since start");
  setText("t-auth", t.auth_failures + " login failures");
  fill("sessions", doc.sessions, [
    ["Agent", (s) => s.agent || "-"],
    ["Source", (s) => s.peer],
    ["Transport", (s) => s.transport],
    ["TLS", (s) => (s.tls ? "yes" : "no")],
    ["Up since", (s) => [clock(s.up_since), ago(doc.now - s.up_since)]],
    ["Channels", (s) => [s.channels_open + " open",
                         [s.channels_total + " in all", ...byForward(s.forwards)]]],
    ["Out", (s) => [rate(s.rate_out), bytes(s.bytes_out), "out"]],
    ["In", (s) => [rate(s.rate_in), bytes(s.bytes_in), "in"]],
  ], "no session");
  fill("forwards", doc.forwards, [
    ["Forward", (f) => f.forward],
    ["Open", (f) => String(f.channels_open)],
    ["Opened in all", (f) => String(f.channels_total)],
  ], "no channel yet");
  fill("reasons", Object.entries(doc.refusals.by_reason), [
    ["Reason", (e) => e[0].replace(/_/g, " ")],
    ["Count", (e) => String(e[1])],
  ], "none");
  fill("refusals", doc.refusals.recent, [
    ["Time", (r) => clock(r.at)],
    ["Session", (r) => r.session],
    ["Reason", (r) => [r.reason.replace(/_/g, " "), r.count > 1 ? r.count + " times" : "", "bad"]],
    ["Destination", (r) => r.destination || "-"],
    ["Why", (r) => r.text],
  ], "no refusal");
  draw(doc.history.points, doc.now);
}

function draw(points, now) {
  const canvas = $("graph"), ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  const style = getComputedStyle(document.body);
  const span = 300, left = 70, bottom = 18;
  let top = 1024;
  for (const p of points) top = Math.max(top, p[1], p[2]);
  const step = Math.pow(1024, Math.floor(Math.log(top) / Math.log(1024)));
  top = Math.ceil(top / step * 1.1) * step;
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = style.getPropertyValue("--mute");
  g.strokeStyle = style.getPropertyValue("--line");
  for (let i = 0; i <= 4; i++) {
    const y = 4 + (h - bottom - 4) * i / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(w, y); g.stroke();
    g.fillText(rate(top * (4 - i) / 4), 2, y + 4);
  }
  g.fillText("\u2212" + span / 60 + " min", left, h - 4);
  g.fillText("now", w - 24, h - 4);
  const x = (t) => left + (w - left) * (1 - (now - t) / span);
  const y = (v) => 4 + (h - bottom - 4) * (1 - v / top);
  if (!points.length) return;
  // inbound as a shaded area, outbound as a line over it: both stay visible
  // when they are equal (an echo).
  for (const [index, color, area] of [[2, "--in", true], [1, "--out", false]]) {
    g.beginPath();
    points.forEach((p, i) => (i ? g.lineTo(x(p[0]), y(p[index]))
                                : g.moveTo(x(p[0]), y(p[index]))));
    g.strokeStyle = g.fillStyle = style.getPropertyValue(color);
    g.lineWidth = area ? 1 : 2;
    g.stroke();
    if (area) {
      g.lineTo(x(points[points.length - 1][0]), y(0));
      g.lineTo(x(points[0][0]), y(0));
      g.globalAlpha = 0.25;
      g.fill();
      g.globalAlpha = 1;
    }
  }
}

let last = null;
async function poll() {
  try {
    const response = await fetch("api/status", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    last = await response.json();
    render(last);
    $("status").className = "pill live";
    $("status").textContent = "live";
  } catch (error) {
    $("status").className = "pill down";
    $("status").textContent = "no answer: " + error.message;
  } finally {
    setTimeout(poll, 1000);
  }
}
window.addEventListener("resize", () => last && draw(last.history.points, last.now));
poll();
"""


def _table(table_id: str, columns: str, *, cards: bool = True) -> str:
    heads = "".join(f"<th>{name}</th>" for name in columns.split(","))
    cls = ' class="cards"' if cards else ""
    return (f'<div class="scroll"><table id="{table_id}"{cls}><thead><tr>{heads}</tr></thead>'
            "<tbody></tbody></table></div>")


def _tile(value_id: str, label: str, sub_id: str = "", cls: str = "") -> str:
    sub = f'<div class="k" id="{sub_id}"></div>' if sub_id else ""
    return (f'<div class="tile"><div class="k">{label}</div>'
            f'<div class="v {cls}" id="{value_id}">-</div>{sub}</div>')


_BODY: Final = f"""
<header><h1>wstunnel <span id="role" class="mute"></span></h1>
<span id="status" class="pill">connecting\u2026</span><span id="meta" class="mute"></span></header>
<main>
<section class="tiles">
{_tile("t-sessions", "Sessions", "t-sessions-total")}
{_tile("t-channels", "Channels open", "t-channels-total")}
{_tile("rate-out", "Outbound (to the tunnel)", "bytes-out", "out")}
{_tile("rate-in", "Inbound (from the tunnel)", "bytes-in", "in")}
{_tile("t-refusals", "Refused channels", "t-auth", "bad")}
{_tile("t-reconnects", "Reconnects")}
</section>
<section class="card"><h2>Traffic, last 5 minutes</h2><canvas id="graph"></canvas>
<div class="legend"><span class="out">\u25a0 outbound</span><span class="in">\u25a0 inbound</span>
</div></section>
<section class="card"><h2>Sessions</h2>
{_table("sessions", "Agent,Source,Transport,TLS,Up since,Channels,Out,In")}</section>
<section class="card"><h2>Channels per forward</h2>
{_table("forwards", "Forward,Open,Opened in all", cards=False)}</section>
<section class="card"><h2>Refusals</h2>
{_table("reasons", "Reason,Count", cards=False)}
<h2 class="mute">Recent</h2>{_table("refusals", "Time,Session,Reason,Destination,Why")}</section>
</main>
<footer class="mute">For scripts: <a href="api/status">api/status</a> (JSON) and
<a href="metrics">metrics</a> (Prometheus).</footer>
"""

PAGE: Final = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width,initial-scale=1">'
    f"<title>wstunnel</title><style>{_STYLE}</style></head><body>{_BODY}"
    f"<script>{_SCRIPT}</script></body></html>\n"
)


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: Only this page's own inline style and script run, and it talks only to its origin.
CONTENT_SECURITY_POLICY: Final = (
    f"default-src 'none'; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
