(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var cy = JSON.parse(document.getElementById("graph-data").textContent);
  var nodes = cy.elements.nodes, edges = cy.elements.edges;
  var svg = document.getElementById("graph");
  var viewport = document.getElementById("viewport");
  var edgeLayer = document.getElementById("edges"), nodeLayer = document.getElementById("nodes");
  var tooltip = document.getElementById("tooltip");
  var slider = document.getElementById("weight-slider");
  var attrSelect = document.getElementById("weight-attr");
  var shownLabel = document.getElementById("edges-shown");
  var minLabel = document.getElementById("weight-min");
  var byId = {}, nodeEls = {}, edgeEls = [];
  var view = {x: 0, y: 0, k: 1};

  function el(tag, attrs, parent) {
    var e = document.createElementNS(SVGNS, tag);
    for (var a in attrs) { e.setAttribute(a, attrs[a]); }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function applyView() {
    viewport.setAttribute("transform", "translate(" + view.x + "," + view.y + ") scale(" + view.k + ")");
  }
  function fit() {
    if (!nodes.length) { return; }
    var xs = nodes.map(function (n) { return n.position.x; });
    var ys = nodes.map(function (n) { return n.position.y; });
    var minX = Math.min.apply(null, xs) - 70, maxX = Math.max.apply(null, xs) + 70;
    var minY = Math.min.apply(null, ys) - 40, maxY = Math.max.apply(null, ys) + 40;
    var w = svg.clientWidth || 800, h = svg.clientHeight || 600;
    view.k = Math.min(w / (maxX - minX), h / (maxY - minY), 2);
    view.x = (w - (maxX + minX) * view.k) / 2;
    view.y = (h - (maxY + minY) * view.k) / 2;
    applyView();
  }
  function zoomAt(factor, cx, cy0) {
    var k = Math.max(0.05, Math.min(20, view.k * factor));
    view.x = cx - (cx - view.x) * (k / view.k);
    view.y = cy0 - (cy0 - view.y) * (k / view.k);
    view.k = k;
    applyView();
  }

  // ---- numeric edge attributes offered by the filter
  var numericAttrs = [];
  ["weight", "norm_weight", "abs_avg_logit_diff", "mean_logit_diff", "n_prompts"].forEach(function (a) {
    if (edges.some(function (e) { return typeof e.data[a] === "number"; })) { numericAttrs.push(a); }
  });
  numericAttrs.forEach(function (a) {
    var o = document.createElement("option");
    o.value = a; o.textContent = "|" + a + "|";
    attrSelect.appendChild(o);
  });
  function value(e, a) { var v = e.data[a]; return typeof v === "number" ? Math.abs(v) : 0; }
  var maxW = Math.max.apply(null, [1e-12].concat(edges.map(function (e) { return value(e, "weight"); })));

  // ---- draw edges (under the nodes)
  nodes.forEach(function (n) { byId[n.data.id] = n; });
  edges.forEach(function (e) {
    var s = byId[e.data.source], t = byId[e.data.target];
    if (!s || !t) { throw new Error("edge " + e.data.id + " names a missing node"); }
    var x1 = s.position.x, y1 = s.position.y, x2 = t.position.x, y2 = t.position.y;
    var bend = e.data.type === "s" ? 18 : -18;
    var mx = (x1 + x2) / 2 + bend, my = (y1 + y2) / 2;
    var dx = x2 - mx, dy = y2 - my, len = Math.sqrt(dx * dx + dy * dy) || 1;
    var stop = t.data.kind === "root" ? 18 : 19;  // end the arrow at the target's outline
    x2 -= dx / len * stop; y2 -= dy / len * stop;
    var width = 0.6 + 5 * value(e, "weight") / maxW;
    var path = el("path", {
      "class": "edge type-" + (e.data.type || "d"),
      "d": "M" + x1 + "," + y1 + " Q" + mx + "," + my + " " + x2 + "," + y2,
      "stroke-width": width.toFixed(2),
      "marker-end": "url(#arrow-" + (e.data.type === "s" ? "s" : "d") + ")",
      "data-id": e.data.id
    }, edgeLayer);
    var title = el("title", {}, path);
    title.textContent = e.data.source + " -> " + e.data.target + "\ntype " + e.data.type +
      "  weight " + (typeof e.data.weight === "number" ? e.data.weight.toPrecision(4) : "?");
    edgeEls.push({data: e, el: path});
  });

  // ---- draw nodes
  nodes.forEach(function (n) {
    var d = n.data, kind = d.kind || "head";
    var g = el("g", {
      "class": "node kind-" + kind.replace(" ", "-"),
      "data-id": d.id,
      "transform": "translate(" + n.position.x + "," + n.position.y + ")"
    }, nodeLayer);
    if (kind === "head") {
      el("circle", {r: 17}, g);
    } else if (kind === "AH bias") {
      el("polygon", {points: "0,-17 24,0 0,17 -24,0"}, g);
    } else if (kind === "root") {
      el("rect", {x: -110, y: -16, width: 220, height: 32, rx: 6}, g);
    } else {
      el("rect", {x: -24, y: -14, width: 48, height: 28, rx: 3}, g);
    }
    var top = el("text", {y: -1}, g), bottom = el("text", {y: 10}, g);
    if (kind === "head") { top.textContent = d.layer + "." + d.head; }
    else if (kind === "MLP") { top.textContent = "MLP" + d.layer; }
    else if (kind === "AH bias") { top.textContent = "bias" + d.layer; }
    else if (kind === "Embedding") { top.textContent = "Emb"; }
    else { top.textContent = d.label; }
    var pos = d.positions || [];
    bottom.textContent = kind === "root" ? "" :
      (pos.length === 2 && pos[0] !== pos[1] ? pos[0] + "\u2192" + pos[1] : (pos[0] || ""));
    nodeEls[d.id] = g;
    g.addEventListener("mouseenter", function (ev) { showTip(n, ev); highlight(d.id, true); });
    g.addEventListener("mousemove", function (ev) { moveTip(ev); });
    g.addEventListener("mouseleave", function () { tooltip.style.display = "none"; highlight(d.id, false); });
  });

  function showTip(n, ev) {
    var d = n.data, lines = [d.label, "id: " + d.id];
    if (d.kind !== "root") {
      lines.push("layer: " + d.layer);
      lines.push(d.kind === "head" ? "head: " + d.head : "component: " + d.component);
      lines.push("positions: dest " + d.dest + ", src " + d.src);
    } else { lines.push("position: " + d.dest); }
    if (d.n_appearences !== undefined) { lines.push("n_appearences: " + d.n_appearences); }
    var ins = 0, outs = 0;
    edgeEls.forEach(function (e) {
      if (e.data.data.target === d.id) { ins++; }
      if (e.data.data.source === d.id) { outs++; }
    });
    lines.push("in-edges: " + ins + ", out-edges: " + outs);
    tooltip.textContent = lines.join("\n");
    tooltip.style.display = "block";
    moveTip(ev);
  }
  function moveTip(ev) {
    var r = svg.getBoundingClientRect();
    tooltip.style.left = (ev.clientX - r.left + 14) + "px";
    tooltip.style.top = (ev.clientY - r.top + 14) + "px";
  }
  function highlight(id, on) {
    nodeEls[id].classList.toggle("hl", on);
    edgeEls.forEach(function (e) {
      if (e.data.data.source === id || e.data.data.target === id) { e.el.classList.toggle("hl", on); }
    });
  }

  // ---- weight filter
  function applyFilter() {
    var a = attrSelect.value || "weight";
    var vals = edges.map(function (e) { return value(e, a); });
    var maxV = Math.max.apply(null, [0].concat(vals));
    var thr = maxV * Number(slider.value) / 1000;
    var shown = 0;
    edgeEls.forEach(function (e, i) {
      var hide = vals[i] < thr;
      e.el.classList.toggle("hidden", hide);
      if (!hide) { shown++; }
    });
    minLabel.textContent = thr.toPrecision(3);
    shownLabel.textContent = shown + " / " + edges.length;
  }
  slider.addEventListener("input", applyFilter);
  attrSelect.addEventListener("change", applyFilter);

  // ---- pan and zoom
  var drag = null;
  svg.addEventListener("mousedown", function (ev) {
    drag = {x: ev.clientX, y: ev.clientY, vx: view.x, vy: view.y};
    svg.classList.add("dragging");
  });
  window.addEventListener("mousemove", function (ev) {
    if (!drag) { return; }
    view.x = drag.vx + ev.clientX - drag.x;
    view.y = drag.vy + ev.clientY - drag.y;
    applyView();
  });
  window.addEventListener("mouseup", function () { drag = null; svg.classList.remove("dragging"); });
  svg.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var r = svg.getBoundingClientRect();
    zoomAt(ev.deltaY < 0 ? 1.15 : 1 / 1.15, ev.clientX - r.left, ev.clientY - r.top);
  }, {passive: false});
  document.getElementById("zoom-in").addEventListener("click", function () {
    zoomAt(1.25, svg.clientWidth / 2, svg.clientHeight / 2);
  });
  document.getElementById("zoom-out").addEventListener("click", function () {
    zoomAt(1 / 1.25, svg.clientWidth / 2, svg.clientHeight / 2);
  });
  document.getElementById("fit").addEventListener("click", fit);
  window.addEventListener("resize", fit);

  applyFilter();
  fit();
  document.body.setAttribute("data-rendered", String(nodes.length));
  document.body.setAttribute("data-edges", String(edges.length));

  // ---- "#selftest": exercise hover, filter and zoom, report into <pre id="selftest"> (for tests)
  if (window.location.hash === "#selftest") {
    var report = {};
    var heads = nodes.filter(function (n) { return n.data.kind === "head"; });
    var probe = heads.length ? heads[0] : nodes[0];
    var first = probe ? nodeEls[probe.data.id] : null;
    if (first) {
      first.dispatchEvent(new MouseEvent("mouseenter", {clientX: 10, clientY: 10}));
      report.tooltip = tooltip.textContent;
      report.tooltip_visible = tooltip.style.display === "block";
      report.highlighted = document.querySelectorAll(".node.hl").length;
      first.dispatchEvent(new MouseEvent("mouseleave"));
    }
    attrSelect.value = "weight";
    slider.value = "500";
    slider.dispatchEvent(new Event("input"));
    report.shown_at_half = edgeEls.filter(function (e) { return !e.el.classList.contains("hidden"); }).length;
    slider.value = "0";
    slider.dispatchEvent(new Event("input"));
    report.shown_at_zero = document.querySelectorAll("path.edge:not(.hidden)").length;
    var k0 = view.k;
    document.getElementById("zoom-in").click();
    report.zoom_ratio = view.k / k0;
    fit();
    document.getElementById("selftest").textContent = JSON.stringify(report);
  }
})();
