// Switchyard dashboard: the overview's charts (uPlot) and the live run list (server-sent
// events). Served as a file of the binary: the pages allow no inline script.
"use strict";

(function () {
  // --- Charts -------------------------------------------------------------------------------
  var charts = [];

  function width(el) {
    return Math.max(260, Math.floor(el.getBoundingClientRect().width));
  }

  function draw(el, opts, data) {
    if (el._plot) {
      el._plot.setData(data);
      return;
    }
    el.textContent = "";
    opts.width = width(el);
    opts.height = 180;
    el._plot = new uPlot(opts, data, el);
    charts.push(el);
  }

  function empty(el, text) {
    if (el._plot) {
      el._plot.destroy();
      el._plot = null;
    }
    el.textContent = text;
    el.classList.add("empty");
  }

  var COLORS = ["#1f6feb", "#b35900", "#2da44e", "#8250df", "#cf222e", "#0a7d8c", "#6e7781"];

  function sampleChart(el, samples, key) {
    var xs = [], ys = [];
    samples.forEach(function (s) {
      xs.push(s.at);
      ys.push(s[key] === null || s[key] === undefined ? null : s[key]);
    });
    if (xs.length === 0) {
      empty(el, "No samples yet: the first arrives within 5 seconds.");
      return;
    }
    if (ys.every(function (y) { return y === null; })) {
      empty(el, key === "scheduler_lag_ms" ? "No schedule fire recorded yet." : "No run has ended in the window.");
      return;
    }
    el.classList.remove("empty");
    draw(el, {
      legend: { show: false },
      series: [{}, { label: el.getAttribute("data-chart"), stroke: "#1f6feb", width: 2, fill: "rgba(31,111,235,0.08)", spanGaps: false }],
      axes: [{}, { size: 56 }],
      scales: { y: { range: key === "success_rate" ? [0, 100] : function (u, min, max) { return [0, Math.max(1, max * 1.1)]; } } },
    }, [xs, ys]);
  }

  function spendChart(el, days, spend) {
    var names = Object.keys(spend);
    if (days.length === 0 || names.length === 0) {
      empty(el, "No spending recorded in the last 14 days.");
      return;
    }
    el.classList.remove("empty");
    var xs = days.map(function (d) { return Date.parse(d + "T00:00:00Z") / 1000; });
    var series = [{}];
    var data = [xs];
    names.forEach(function (name, i) {
      series.push({ label: name, stroke: COLORS[i % COLORS.length], width: 2, points: { show: true, size: 6 } });
      data.push(spend[name]);
    });
    draw(el, { series: series, axes: [{}, { size: 64 }] }, data);
  }

  function refreshCharts(box) {
    fetch(box.getAttribute("data-series"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (series) {
        document.querySelectorAll("[data-chart]").forEach(function (el) {
          var key = el.getAttribute("data-chart");
          if (key === "spend") {
            spendChart(el, series.days, series.spend);
          } else {
            sampleChart(el, series.samples, key);
          }
        });
      })
      .catch(function () { /* the next refresh tries again */ });
  }

  window.addEventListener("resize", function () {
    charts.forEach(function (el) {
      if (el._plot) el._plot.setSize({ width: width(el), height: 180 });
    });
  });

  // --- Live runs ----------------------------------------------------------------------------
  function followRuns(tbody) {
    var source = new EventSource(tbody.getAttribute("data-live"));
    source.addEventListener("run", function (event) {
      var template = document.createElement("template");
      template.innerHTML = event.data.trim();
      var row = template.content.firstElementChild;
      if (!row) return;
      var existing = document.getElementById(row.id);
      if (existing) {
        existing.replaceWith(row);
      } else {
        tbody.insertBefore(row, tbody.firstElementChild);
      }
      var none = tbody.closest("section, main").querySelector("p.muted.none");
      if (none) none.remove();
    });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  // --- A run's live part ----------------------------------------------------------------------
  // htmx replaces it every second while the run goes on: the sections a person opened or closed
  // (a click on their summary, which the keyboard also makes) stay so; the others open as the
  // server says (a failed step's opens).
  var chosen = {};
  document.addEventListener("click", function (event) {
    var summary = event.target.closest && event.target.closest("#run-live details[id] > summary");
    if (summary) {
      var details = summary.parentElement;
      chosen[details.id] = !details.open;
    }
  });
  document.addEventListener("htmx:afterSettle", function () {
    var live = document.getElementById("run-live");
    if (!live) return;
    live.querySelectorAll("details[id]").forEach(function (d) {
      if (Object.prototype.hasOwnProperty.call(chosen, d.id) && d.open !== chosen[d.id]) {
        d.open = chosen[d.id];
      }
    });
  });

  function start() {
    var box = document.querySelector("[data-series]");
    if (box && window.uPlot) {
      refreshCharts(box);
      setInterval(function () { refreshCharts(box); }, 5000);
    }
    document.querySelectorAll("tbody[data-live]").forEach(followRuns);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
