// Sendense console: the few behaviours plain HTML lacks. Loaded as a file
// (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
  document.addEventListener("click", function (event) {
    var el = event.target.closest("[data-copy], [data-back]");
    if (!el) { return; }
    if (el.hasAttribute("data-back") && window.history.length > 1) {
      event.preventDefault();
      window.history.back();
    } else if (el.hasAttribute("data-copy")) {
      var text = document.getElementById(el.getAttribute("data-copy")).textContent;
      if (navigator.clipboard) { navigator.clipboard.writeText(text); }
      el.textContent = "Copied";
    }
  });
})();

// Charts (uPlot 1.6.32, vendored): each .chart carries its data in
// data-chart (JSON written by the server), so no extra request is made.
(function () {
  "use strict";
  var UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  function size(n) {
    var i = 0;
    n = Number(n) || 0;
    while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + UNITS[i];
  }
  function secs(n) {
    n = Number(n) || 0;
    return n < 120 ? n.toFixed(0) + " s" : (n / 60).toFixed(1) + " min";
  }
  var COLOURS = ["#1f5fa8", "#b36200"];
  function draw(el) {
    var spec = JSON.parse(el.getAttribute("data-chart"));
    var xs = spec.days.map(function (d) { return Date.parse(d + "T00:00:00Z") / 1000; });
    var data = [xs];
    var series = [{}];
    var axes = [{}];
    spec.series.forEach(function (s, i) {
      var scale = s.unit;
      var fmt = s.unit === "bytes" ? size : secs;
      data.push(s.values);
      series.push({
        label: s.label, scale: scale, stroke: COLOURS[i % 2], width: 2,
        fill: i === 0 ? "rgba(31,95,168,0.08)" : undefined,
        dash: i === 1 ? [6, 4] : undefined,  // not colour alone
        points: { show: true, size: 4 },
        value: function (u, v) { return v == null ? "-" : fmt(v); }
      });
      axes.push({
        scale: scale, side: i === 0 ? 3 : 1, size: 70,
        grid: { show: i === 0 },
        values: function (u, vals) { return vals.map(fmt); }
      });
    });
    var width = Math.max(280, el.clientWidth || 600);
    el.textContent = "";
    /* global uPlot */
    new uPlot({
      width: width, height: 220, series: series, axes: axes,
      scales: { x: { time: true } }, legend: { live: true }, cursor: { drag: { x: false } }
    }, data, el);
  }
  function all() {
    if (typeof uPlot === "undefined") { return; }
    document.querySelectorAll(".chart[data-chart]").forEach(function (el) {
      try { draw(el); } catch (e) { el.textContent = "(chart unavailable: " + e + ")"; }
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", all);
  } else {
    all();
  }
})();

// A running job's page: server-sent events carry its live part as HTML
// (rendered and escaped by the hub) until the job ends.
(function () {
  "use strict";
  function follow(el) {
    if (!window.EventSource) { return; }
    var source = new EventSource(el.getAttribute("data-sse"));
    function show(event) { el.innerHTML = event.data; }
    source.addEventListener("progress", show);
    source.addEventListener("end", function (event) {
      show(event);
      source.close();
      el.removeAttribute("data-sse");
      // Actions for a running job only (cancel) go once it has ended.
      document.querySelectorAll("[data-live-only]").forEach(function (x) { x.remove(); });
    });
    source.addEventListener("signed-out", function () {
      source.close();
      window.location.reload();
    });
    source.onerror = function () {
      // Refused (the session ended) or the hub went away: the browser gives
      // up on a refused stream; reload to show what the hub says now.
      if (source.readyState === EventSource.CLOSED) {
        window.setTimeout(function () { window.location.reload(); }, 3000);
      }
    };
  }
  function all() {
    document.querySelectorAll("[data-sse]").forEach(follow);
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", all);
  } else {
    all();
  }
})();
