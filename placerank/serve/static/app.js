// placerank serve: the page. No libraries, no network beyond this server (and --tiles, if given).
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 640, H = 440, R = 6378137;
  const $ = (s) => document.querySelector(s);
  const tiles = document.body.dataset.tiles || "";
  let places = [], frame = "wgs84", last = null;

  function el(name, attrs, parent) {
    const e = document.createElementNS(SVG, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  // planar coordinates in metres: Web Mercator for lat/lon, the database's own frame otherwise
  function xy(p) {
    if (frame === "wgs84") {
      if (p.lat == null) return null;
      const lat = Math.max(-85, Math.min(85, p.lat)) * Math.PI / 180;
      return [R * p.lon * Math.PI / 180, R * Math.log(Math.tan(Math.PI / 4 + lat / 2))];
    }
    return p.easting == null ? null : [p.easting, p.northing];
  }
  function stretch(p) { // Mercator metres per ground metre at p
    return frame === "wgs84" && p && p.lat != null ? 1 / Math.cos(p.lat * Math.PI / 180) : 1;
  }
  function fmtDist(m) {
    if (m == null) return "";
    if (m < 10) return m.toFixed(2) + " m";
    if (m < 1000) return m.toFixed(0) + " m";
    return (m / 1000).toFixed(1) + " km";
  }
  function view(points, minSpan) {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const [x, y] of points) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
    if (!isFinite(x0)) { x0 = -1; x1 = 1; y0 = -1; y1 = 1; }
    const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    let span = Math.max((x1 - x0) * 1.25, (y1 - y0) * 1.25 * W / H, minSpan || 1e-9);
    const s = W / span;
    return { s, x: (x) => W / 2 + (x - cx) * s, y: (y) => H / 2 - (y - cy) * s, cx, cy, span };
  }
  function drawTiles(svg, v) {
    if (!tiles || frame !== "wgs84") return;
    const world = 2 * Math.PI * R;
    const z = Math.max(0, Math.min(19, Math.round(Math.log2(world * v.s / 256))));
    const n = 2 ** z, size = world / n;
    const tx = (x) => Math.floor((x + world / 2) / size), ty = (y) => Math.floor((world / 2 - y) / size);
    const xmin = v.cx - W / 2 / v.s, xmax = v.cx + W / 2 / v.s, ymin = v.cy - H / 2 / v.s, ymax = v.cy + H / 2 / v.s;
    for (let i = tx(xmin); i <= tx(xmax); i++) {
      for (let j = ty(ymax); j <= ty(ymin); j++) {
        if (j < 0 || j >= n) continue;
        const href = tiles.replace("{z}", z).replace("{x}", ((i % n) + n) % n).replace("{y}", j);
        const x = i * size - world / 2, y = world / 2 - j * size;
        el("image", { href, x: v.x(x), y: v.y(y), width: size * v.s + 0.5, height: size * v.s + 0.5 }, svg);
      }
    }
  }
  function drawScale(svg, v, at) {
    const ground = (W / 4) / v.s / stretch(at);
    const nice = Math.pow(10, Math.floor(Math.log10(ground)));
    const len = [5, 2, 1].map((k) => k * nice).find((d) => d <= ground) || nice;
    const px = len * v.s * stretch(at);
    el("line", { class: "scale", x1: 16, y1: H - 16, x2: 16 + px, y2: H - 16 }, svg);
    el("text", { class: "label", x: 16, y: H - 22 }, svg).textContent = fmtDist(len);
  }
  function drawMap(result) {
    const svg = $("#map");
    svg.replaceChildren();
    const pts = places.map((p) => [p, xy(p)]).filter((a) => a[1]);
    let v;
    const est = result && result.easting != null ? xy(result.lat != null ? result : { easting: result.easting, northing: result.northing }) : null;
    if (est) {
      const r = result.radius_m * stretch(result);
      const near = result.matches.slice(0, 5).filter((m) => m.agrees).map((m) => xy(m)).filter(Boolean);
      v = view([est, ...near], 5 * r);
    } else {
      v = view(pts.map((a) => a[1]), 10);
    }
    drawTiles(svg, v);
    for (const [p, q] of pts) {
      const c = el("circle", { class: "place", cx: v.x(q[0]), cy: v.y(q[1]), r: 3.5 }, svg);
      el("title", {}, c).textContent = p.name;
    }
    if (est) {
      const rpx = Math.max(4, result.radius_m * stretch(result) * v.s);
      el("circle", { class: "radius", id: "radius", cx: v.x(est[0]), cy: v.y(est[1]), r: rpx, "fill-opacity": 0.25 + 0.5 * result.confidence }, svg);
      result.matches.slice(0, 5).forEach((m, k) => {
        const q = xy(m);
        if (!q) return;
        const g = el("g", { class: "match-dot" }, svg);
        el("circle", { class: m.agrees ? "agree" : "other", cx: v.x(q[0]), cy: v.y(q[1]), r: 9 }, g);
        el("text", { class: "num", x: v.x(q[0]), y: v.y(q[1]) }, g).textContent = String(k + 1);
        el("title", {}, g).textContent = "#" + (k + 1) + " " + m.path;
      });
      if (result.query_gps && result.lat != null) {
        const g = xy(result.query_gps);
        const gx = v.x(g[0]), gy = v.y(g[1]);
        const t = el("path", { class: "truth", d: `M${gx - 7},${gy - 7} L${gx + 7},${gy + 7} M${gx - 7},${gy + 7} L${gx + 7},${gy - 7}` }, svg);
        el("title", {}, t).textContent = "the photo's own EXIF GPS";
      }
      const mk = el("g", { id: "marker" }, svg);
      const x = v.x(est[0]), y = v.y(est[1]);
      el("path", { class: "marker", d: `M${x},${y} l-9,-22 a10,10 0 1,1 18,0 z` }, mk);
      el("circle", { cx: x, cy: y - 26, r: 3.5, fill: "#fff" }, mk);
      el("text", { class: "label", x: x + 14, y: y - 28 }, mk).textContent =
        "estimate (confidence " + result.confidence.toFixed(2) + ", radius " + fmtDist(result.radius_m) + ")";
    }
    drawScale(svg, v, est ? result : places[0]);
  }
  function summary(r) {
    const box = $("#summary");
    box.replaceChildren();
    const where = document.createElement("div");
    where.className = "where";
    if (r.easting == null) where.textContent = "no estimate";
    else if (r.lat != null) where.textContent = r.lat.toFixed(6) + ", " + r.lon.toFixed(6);
    else where.textContent = "E " + r.easting.toFixed(3) + " m, N " + r.northing.toFixed(3) + " m";
    box.appendChild(where);
    const conf = document.createElement("span");
    conf.className = "conf" + (r.confidence < 0.5 ? " low" : "");
    conf.textContent = "confidence " + r.confidence.toFixed(2);
    box.appendChild(conf);
    const lines = [
      r.query + " · " + r.matches.length + " matches" + (r.rerank ? " re-ranked by " + r.rerank : "") + " · radius " + fmtDist(r.radius_m),
      "took " + (r.timing_s.total * 1000).toFixed(0) + " ms (queue " + ((r.timing_s.queue || 0) * 1000).toFixed(0) + " ms)",
    ];
    if (r.query_gps && r.query_gps.error_m != null) lines.push("the photo's own GPS is " + fmtDist(r.query_gps.error_m) + " from the estimate");
    for (const n of r.notes) lines.push("note: " + n);
    for (const t of lines) { const d = document.createElement("div"); d.className = "muted"; d.textContent = t; box.appendChild(d); }
    box.hidden = false;
  }
  function strip(r) {
    const s = $("#strip");
    s.replaceChildren();
    r.matches.slice(0, 5).forEach((m) => {
      const f = document.createElement("figure");
      f.className = "match" + (m.agrees ? " agrees" : "");
      const img = document.createElement("img");
      img.src = "/v1/places/" + m.id + "/thumbnail";
      img.alt = m.path;
      img.loading = "lazy";
      const cap = document.createElement("figcaption");
      const score = m.rerank_score != null ? r.rerank + " " + m.rerank_score : "sim " + m.similarity.toFixed(3);
      cap.innerHTML = "";
      const a = document.createElement("div"); a.textContent = "#" + m.rank + " " + m.path;
      const b = document.createElement("div"); b.className = "score"; b.textContent = score;
      const c = document.createElement("div"); c.className = "muted";
      c.textContent = (m.distance_m != null ? fmtDist(m.distance_m) + " · " : "") + (m.agrees ? "agrees" : "other place");
      cap.append(a, b, c);
      f.append(img, cap);
      s.appendChild(f);
    });
    const inl = $("#inliers");
    inl.hidden = !r.match_picture;
    if (r.match_picture) {
      inl.querySelector("img").src = r.match_picture;
      inl.querySelector("figcaption").textContent = r.rerank + ": verified matches between the photo and #1";
    }
    $("#matches").hidden = false;
  }
  function status(text, error) {
    const s = $("#status");
    s.textContent = text;
    s.className = error ? "error" : "";
  }
  async function send(file) {
    if (!file) return;
    const prev = $("#preview");
    prev.src = URL.createObjectURL(file);
    prev.hidden = false;
    $("#droptext").textContent = file.name;
    status("localizing " + file.name + " …");
    const form = new FormData();
    form.append("image", file, file.name);
    try {
      const res = await fetch("/v1/localize", { method: "POST", body: form });
      const j = await res.json();
      if (!res.ok) { status(j.error || "error " + res.status, true); return; }
      last = j;
      status("");
      summary(j);
      drawMap(j);
      strip(j);
      document.body.dataset.state = "done";
    } catch (e) {
      status("request failed: " + e, true);
    }
  }
  async function start() {
    const drop = $("#drop");
    $("#file").addEventListener("change", (e) => send(e.target.files[0]));
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); send(e.dataTransfer.files[0]); });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("#file").click(); });
    try {
      const [pr, hr] = await Promise.all([fetch("/v1/places"), fetch("/v1/health")]);
      const pj = await pr.json(), hj = await hr.json();
      places = pj.places; frame = pj.frame;
      $("#dbinfo").textContent = hj.database_size + " photos · " + hj.model + (hj.rerank ? " + " + hj.rerank : "") + " · " + (frame === "wgs84" ? "GPS" : "local frame (metres)");
      drawMap(last);
      document.body.dataset.ready = "1";
    } catch (e) {
      status("cannot reach the server: " + e, true);
    }
  }
  start();
})();
