"""A job's timeline: one self-contained HTML page drawing its chunks and transforms per
worker process over time (``canonflow status JOB --timeline FILE``).

The page carries the job's data as JSON and draws it with inline JavaScript into an inline
SVG: no network, no CDN, nothing but the file. Times are the workers' own clocks (epoch
seconds in chunk and transform results), shown relative to the job's creation.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from canonflow import jsonio
from canonflow.errors import TerminalError, UnknownJob
from canonflow.report import job_report
from canonflow.stores.state import StateStore


def _rel(ts: float | None, t0: float) -> float | None:
    return None if ts is None else round(ts - t0, 3)


def timeline_data(state: StateStore, job_id: str) -> dict[str, Any]:
    """Everything the page draws, with times in seconds since the job was created."""
    job = state.job(job_id)
    if job is None:
        raise UnknownJob(f"no job {job_id!r} in {state.url}")
    report = job_report(state, job_id)
    results = state.chunk_results(job_id)
    specs = state.chunk_specs(job_id)
    requests = state.requests(job_id)
    t0 = job.created_at.timestamp()
    tables: list[str] = list(report["tables"])
    workers: list[str] = []

    def index(values: list[str], value: str) -> int:
        if value not in values:
            values.append(value)
        return values.index(value)

    for spec in specs:
        index(tables, spec.table.label)
    chunks: list[dict[str, Any]] = []
    untimed_chunks = 0
    for r in results:
        if r.started_at is None or r.finished_at is None or r.worker is None:
            untimed_chunks += 1
            continue
        chunks.append({
            "id": r.chunk_id, "table": index(tables, r.table_metadata.label),
            "worker": index(workers, r.worker), "start": _rel(r.started_at, t0),
            "end": _rel(r.finished_at, t0), "records": r.records_processed,
            "files": r.s3_files_count, "seconds": r.processing_time,
            "error": r.error.message if r.error else None,
        })
    transforms: list[dict[str, Any]] = []
    untimed: list[dict[str, Any]] = []
    for rec in requests:
        res, req = rec.result, rec.request
        item: dict[str, Any] = {
            "id": req.request_id, "table": index(tables, req.table.label),
            "status": rec.status, "attempts": rec.attempts, "error": rec.error,
            "mode": req.processing_mode.value,
        }
        if res is None or res.started_at is None or res.finished_at is None \
                or res.worker is None:
            untimed.append(item)
            continue
        item.update({
            "worker": index(workers, res.worker), "start": _rel(res.started_at, t0),
            "end": _rel(res.finished_at, t0), "seconds": res.seconds,
            "files": res.files_read, "records_read": res.records_read,
            "records_written": res.records_written,
            "records_quarantined": res.records_quarantined,
        })
        transforms.append(item)
    timings = {label: {k: t.get(k) for k in (
        "chunks", "chunks_failed", "records_extracted", "transforms_triggered",
        "extraction_seconds", "aggregation_wait_seconds", "transform_seconds",
        "files_per_transform", "read_per_extracted")}
        for label, t in report["tables"].items()}
    return {
        "job": {
            "job_id": job.job_id, "tenant_id": job.tenant_id, "pipeline": job.pipeline,
            "status": job.status, "outcome": job.outcome, "trigger_mode": job.trigger_mode,
            "created_at": report["created_at"], "seconds": report["seconds"],
            "aggregated": _rel(job.report.get("aggregated_at"), t0),
            "chunks_total": job.total_chunks,
        },
        "tables": tables, "workers": workers, "chunks": chunks, "transforms": transforms,
        "untimed_transforms": untimed, "timings": timings,
        "untimed_chunks": untimed_chunks, "pending_chunks": max(0, len(specs) - len(results)),
    }


def _script_json(data: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' (so no '</script>' or
    '<!--' can end or confuse it) and no line separators JavaScript once choked on."""
    text = jsonio.dumps_str(data)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def render_html(data: dict[str, Any]) -> str:
    title = html.escape(f"canonflow job {data['job']['job_id']}")
    return (_PAGE.replace("{{TITLE}}", title)
            .replace("{{DATA}}", _script_json(data)))


def write_timeline(state: StateStore, job_id: str, path: Path) -> Path:
    """Write the job's timeline page to ``path``; UnknownJob for a job the store lacks, a
    TerminalError for a path that cannot be written."""
    page = render_html(timeline_data(state, job_id))
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise TerminalError(
            f"cannot write the timeline to {str(path)!r}: {exc.strerror or exc}") from None
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
  body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #1d2330; background: #fff; }
  h1 { font-size: 17px; margin: 0 0 4px; }
  .meta { color: #555; margin-bottom: 10px; }
  .meta b { color: #1d2330; font-weight: 600; }
  .bar { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 14px; margin: 8px 0; }
  .key { display: inline-flex; align-items: center; gap: 5px; }
  .swatch { width: 12px; height: 12px; border-radius: 2px; display: inline-block; }
  .swatch.tr { background-image: repeating-linear-gradient(45deg, rgba(0,0,0,.35) 0 2px,
               transparent 2px 5px); outline: 1px solid #333; }
  button { font: inherit; padding: 1px 8px; }
  #wrap { overflow-x: auto; border: 1px solid #dde; border-radius: 4px; }
  svg text { font: 11px system-ui, sans-serif; fill: #333; }
  svg .lane-label { font-family: ui-monospace, monospace; }
  svg .grid { stroke: #e6e8ef; }
  svg .agg { stroke: #d11; stroke-width: 1.5; stroke-dasharray: 5 3; }
  svg .agg-label { fill: #d11; font-weight: 600; }
  svg rect.chunk.failed { stroke: #d11; stroke-width: 2; }
  svg rect.transform { stroke: #222; stroke-width: 1; }
  svg rect:hover { stroke: #000; stroke-width: 2; }
  #tip { position: fixed; pointer-events: none; background: #1d2330; color: #fff;
         padding: 6px 8px; border-radius: 4px; font-size: 12px; white-space: pre;
         display: none; z-index: 2; max-width: 60ch; }
  table { border-collapse: collapse; margin-top: 14px; }
  th, td { padding: 3px 10px; border-bottom: 1px solid #e6e8ef; text-align: right; }
  th:first-child, td:first-child { text-align: left; }
  th { font-weight: 600; background: #f6f7fa; }
  .note { color: #8a4b00; margin-top: 8px; }
</style>
</head>
<body>
<h1 id="title"></h1>
<div class="meta" id="meta"></div>
<div class="bar" id="legend"></div>
<div class="bar">
  <span>zoom</span><button id="zoom-out" type="button">&minus;</button>
  <button id="zoom-in" type="button">+</button><span id="zoom-level"></span>
  <span class="key"><span class="swatch" style="background:#8aa"></span>chunk</span>
  <span class="key"><span class="swatch tr" style="background:#8aa"></span>transform</span>
  <span class="key"><span class="swatch" style="background:#fff;outline:2px solid #d11">
  </span>failed</span>
</div>
<div id="wrap"><svg id="chart" role="img"
  aria-label="chunks and transforms per worker over time"></svg></div>
<div id="notes"></div>
<table id="timings"></table>
<div id="tip"></div>
<script type="application/json" id="job-data">{{DATA}}</script>
<script>
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("job-data").textContent);
  const svg = document.getElementById("chart");
  const NS = svg.namespaceURI;
  const tip = document.getElementById("tip");
  const job = data.job;
  const LANE = 16, BAR = 12, TOP = 44, LEFT = 190, RIGHT = 24, STRIP = 40;
  let zoom = 1;

  function el(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function html(tag, text, parent) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (parent) parent.appendChild(node);
    return node;
  }
  function colour(i) { return "hsl(" + ((i * 137.508) % 360).toFixed(1) + ", 62%, 58%)"; }
  function secs(v) { return v === null || v === undefined ? "" : Number(v).toFixed(2); }
  function niceStep(span, count) {
    const raw = span / Math.max(1, count), p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (raw <= m * p) return m * p;
    return 10 * p;
  }

  document.getElementById("title").textContent =
    "job " + job.job_id + " \\u2014 " + job.tenant_id + " (" + job.pipeline + ")";
  const meta = document.getElementById("meta");
  const metaParts = [["status", job.status + (job.outcome ? " / " + job.outcome : "")],
    ["trigger", job.trigger_mode], ["created", job.created_at],
    ["seconds", secs(job.seconds)], ["chunks", data.chunks.length + " of " + job.chunks_total],
    ["transforms", data.transforms.length + data.untimed_transforms.length],
    ["workers", data.workers.length],
    ["aggregated", job.aggregated === null ? "not yet" : "+" + secs(job.aggregated) + " s"]];
  metaParts.forEach(function (p, i) {
    if (i) meta.appendChild(document.createTextNode("  \\u00b7  "));
    meta.appendChild(document.createTextNode(p[0] + " "));
    html("b", p[1], meta);
  });
  const legend = document.getElementById("legend");
  data.tables.forEach(function (t, i) {
    const key = html("span", null, legend); key.className = "key";
    const sw = html("span", null, key); sw.className = "swatch"; sw.style.background = colour(i);
    html("span", t, key);
  });

  // lanes: one per worker process (sorted by first activity), sub-rows where items overlap
  const items = [];
  data.chunks.forEach(function (c) { items.push({kind: "chunk", d: c}); });
  data.transforms.forEach(function (t) { items.push({kind: "transform", d: t}); });
  items.sort(function (a, b) { return a.d.start - b.d.start || a.d.end - b.d.end; });
  const firstSeen = data.workers.map(function () { return Infinity; });
  items.forEach(function (it) {
    firstSeen[it.d.worker] = Math.min(firstSeen[it.d.worker], it.d.start);
  });
  const order = data.workers.map(function (_, i) { return i; })
    .sort(function (a, b) { return firstSeen[a] - firstSeen[b]; });
  const rowEnds = data.workers.map(function () { return []; });
  items.forEach(function (it) {
    const ends = rowEnds[it.d.worker];
    let row = ends.findIndex(function (e) { return e <= it.d.start + 1e-6; });
    if (row < 0) { row = ends.length; ends.push(0); }
    ends[row] = it.d.end;
    it.row = row;
  });
  const laneTop = [];
  let y = TOP + STRIP + 10;
  order.forEach(function (w) {
    laneTop[w] = y;
    y += Math.max(1, rowEnds[w].length) * LANE + 8;
  });
  const height = y + 10;
  let span = 0;
  items.forEach(function (it) { span = Math.max(span, it.d.end); });
  if (job.aggregated !== null) span = Math.max(span, job.aggregated);
  span = Math.max(span, 0.001);

  function draw() {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const avail = Math.max(600, (document.getElementById("wrap").clientWidth || 900) - 2);
    const width = Math.round(avail * zoom);
    const plot = width - LEFT - RIGHT;
    const x = function (t) { return LEFT + (t / span) * plot; };
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    document.getElementById("zoom-level").textContent = zoom + "\\u00d7";

    // time axis and grid
    const step = niceStep(span, Math.max(2, Math.floor(plot / 90)));
    const grid = el("g", {"class": "axis"}, svg);
    for (let t = 0; t <= span + 1e-9; t += step) {
      el("line", {"class": "grid", x1: x(t), x2: x(t), y1: TOP - 6, y2: height - 4}, grid);
      el("text", {x: x(t), y: TOP - 10, "text-anchor": "middle"}, grid).textContent =
        (step < 1 ? t.toFixed(step < 0.1 ? 2 : 1) : t.toFixed(0)) + " s";
    }
    el("text", {x: 8, y: TOP - 28}, grid).textContent = "seconds since the job was created";

    // concurrency strip: how many chunks and transforms run at each moment
    const events = [];
    items.forEach(function (it) {
      events.push([it.d.start, 1, it.kind]); events.push([it.d.end, -1, it.kind]);
    });
    events.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1]; });
    let running = {chunk: 0, transform: 0}, peak = 1;
    const steps = [];
    events.forEach(function (e) {
      running[e[2]] += e[1];
      steps.push([e[0], running.chunk, running.transform]);
      peak = Math.max(peak, running.chunk + running.transform);
    });
    const base = TOP + STRIP, scale = (STRIP - 4) / peak;
    const strip = el("g", {"class": "concurrency"}, svg);
    el("text", {x: 8, y: base - 14}, strip).textContent = "running (peak " + peak + ")";
    ["chunk", "transform"].forEach(function (kind) {
      let d = "M" + x(0) + "," + base, prev = 0;
      steps.forEach(function (s) {
        const v = kind === "chunk" ? s[1] : s[1] + s[2];
        d += "L" + x(s[0]) + "," + (base - prev * scale) + "L" + x(s[0]) + "," + (base - v * scale);
        prev = v;
      });
      d += "L" + x(span) + "," + base + "Z";
      el("path", {d: d, fill: kind === "chunk" ? "#7a8fb8" : "#c9a13b",
                  "fill-opacity": kind === "chunk" ? 0.75 : 0.45}, strip)
        .setAttribute("data-series", kind);
    });

    // lanes
    const lanes = el("g", {"class": "lanes"}, svg);
    order.forEach(function (w, i) {
      const top = laneTop[w], h = Math.max(1, rowEnds[w].length) * LANE;
      if (i % 2 === 0) el("rect", {x: 0, y: top - 3, width: width, height: h + 6,
                                   fill: "#f7f8fb"}, lanes);
      const label = el("text", {"class": "lane-label", x: 8, y: top + LANE - 5}, lanes);
      label.textContent = data.workers[w];
      el("title", {}, label).textContent = "worker process " + data.workers[w];
    });
    const bars = el("g", {"class": "bars"}, svg);
    items.forEach(function (it, i) {
      const d = it.d;
      const rx = x(d.start), rw = Math.max(1, x(d.end) - rx);
      const attrs = {x: rx.toFixed(2), width: rw.toFixed(2), height: BAR, rx: 1.5,
                     y: laneTop[d.worker] + it.row * LANE, fill: colour(d.table),
                     "data-i": i, "data-table": data.tables[d.table]};
      if (it.kind === "chunk") {
        attrs["class"] = "chunk" + (d.error ? " failed" : "");
        attrs["data-chunk-id"] = d.id;
      } else {
        attrs["class"] = "transform" + (d.error && d.status === "failed" ? " failed" : "");
        attrs["data-request-id"] = d.id;
        attrs["fill"] = "url(#hatch-" + d.table + ")";
      }
      el("title", {}, el("rect", attrs, bars)).textContent = describe(it);
    });
    const defs = el("defs", {}, svg);
    data.tables.forEach(function (_, t) {
      const p = el("pattern", {id: "hatch-" + t, width: 6, height: 6,
                               patternUnits: "userSpaceOnUse",
                               patternTransform: "rotate(45)"}, defs);
      el("rect", {width: 6, height: 6, fill: colour(t)}, p);
      el("rect", {width: 2, height: 6, fill: "rgba(0,0,0,0.35)"}, p);
    });
    svg.insertBefore(defs, svg.firstChild);

    // the aggregation moment: the fan-in
    if (job.aggregated !== null) {
      const g = el("g", {"class": "aggregation"}, svg);
      el("line", {"class": "agg", x1: x(job.aggregated), x2: x(job.aggregated),
                  y1: TOP - 4, y2: height - 4}, g);
      const right = x(job.aggregated) > width - 160;
      el("text", {"class": "agg-label", x: x(job.aggregated) + (right ? -4 : 4), y: TOP + 8,
                  "text-anchor": right ? "end" : "start"}, g).textContent =
        "aggregated +" + secs(job.aggregated) + " s";
    }
  }

  function describe(it) {
    const d = it.d, table = data.tables[d.table];
    const lines = it.kind === "chunk"
      ? ["chunk " + d.id, table, d.records + " records, " + d.files + " file(s)",
         secs(d.seconds) + " s (+" + secs(d.start) + " \\u2192 +" + secs(d.end) + ")"]
      : ["transform " + d.id, table + " (" + d.mode + ", attempt " + d.attempts + ")",
         d.files + " file(s), " + d.records_read + " read, " + d.records_written +
         " written, " + d.records_quarantined + " quarantined",
         secs(d.seconds) + " s (+" + secs(d.start) + " \\u2192 +" + secs(d.end) + ")"];
    lines.push("worker " + data.workers[d.worker]);
    if (d.error) lines.push("error: " + d.error);
    return lines.join("\\n");
  }

  svg.addEventListener("mousemove", function (ev) {
    const i = ev.target.getAttribute && ev.target.getAttribute("data-i");
    if (i === null || i === undefined) { tip.style.display = "none"; return; }
    tip.textContent = describe(items[Number(i)]);
    tip.style.display = "block";
    tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  });
  svg.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  document.getElementById("zoom-in").addEventListener("click", function () {
    zoom = Math.min(64, zoom * 2); draw();
  });
  document.getElementById("zoom-out").addEventListener("click", function () {
    zoom = Math.max(1, zoom / 2); draw();
  });

  // notes: what the chart cannot show
  const notes = document.getElementById("notes");
  function note(text) { const n = html("div", text, notes); n.className = "note"; }
  if (data.pending_chunks) note(data.pending_chunks + " chunk(s) without a result yet");
  if (data.untimed_chunks) note(data.untimed_chunks + " chunk result(s) carry no times " +
                                "(recorded by an earlier release): not drawn");
  data.untimed_transforms.forEach(function (t) {
    note("transform " + t.id + " (" + data.tables[t.table] + "): " + t.status +
         (t.error ? ", " + t.error : "") + ", no times recorded: not drawn");
  });

  // per-table timings, as `canonflow status JOB` reports them
  const tab = document.getElementById("timings");
  const head = html("tr", null, tab);
  ["table", "chunks", "records", "extraction s", "wait for aggregation s", "transform s",
   "transforms", "files / transform", "read / extracted"].forEach(function (h) {
    html("th", h, head);
  });
  data.tables.forEach(function (label) {
    const t = data.timings[label];
    if (!t) return;
    const row = html("tr", null, tab);
    [label, t.chunks + (t.chunks_failed ? " (" + t.chunks_failed + " failed)" : ""),
     t.records_extracted, secs(t.extraction_seconds), secs(t.aggregation_wait_seconds),
     secs(t.transform_seconds), t.transforms_triggered,
     t.files_per_transform === null ? "" : t.files_per_transform,
     t.read_per_extracted === null ? "" : Number(t.read_per_extracted).toFixed(2)]
      .forEach(function (v) { html("td", v, row); });
  });

  draw();
  let resizeTimer = 0;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer); resizeTimer = setTimeout(draw, 150);
  });
})();
</script>
</body>
</html>
"""
