// The two per-round charts (uPlot): test quality and loss, bytes up and down.
//
// A canvas says nothing to a screen reader, so each chart's element carries a role="img"
// label with the latest values, and the page has the same numbers as a table.
"use strict";

(function (root) {
  const BLUE = "#1f5fbf";
  const RED = "#b3261e";
  const BROWN = "#6b4e16";
  const GREEN = "#1e6b34";

  function line(label, scale, stroke, dash, value) {
    return { label, scale, stroke, width: 2, dash, points: { show: true, size: 6 }, spanGaps: true, value };
  }

  const pct = (u, v) => (v == null ? "–" : `${v.toFixed(2)} %`);
  const num = (u, v) => (v == null ? "–" : v.toPrecision(4));
  const kb = (u, v) => (v == null ? "–" : `${v.toFixed(1)} kB`);

  // Series and data of each chart; regression runs show RMSE and MAE instead of accuracy.
  const KINDS = {
    classification: {
      series: [
        line("test accuracy", "%", BLUE, undefined, pct),
        line("test loss", "loss", RED, [6, 4], num),
        line("train loss", "loss", BROWN, [2, 3], num),
      ],
      axes: [{ scale: "%", label: "accuracy (%)" }, { scale: "loss", label: "loss", side: 1 }],
      values: (m) => [m.test_accuracy == null ? null : 100 * m.test_accuracy, m.test_loss, m.train_loss],
    },
    regression: {
      series: [
        line("test RMSE", "err", BLUE, undefined, num),
        line("test MAE", "err", GREEN, [6, 4], num),
        line("train loss", "loss", BROWN, [2, 3], num),
      ],
      axes: [{ scale: "err", label: "RMSE, MAE" }, { scale: "loss", label: "loss", side: 1 }],
      values: (m) => [m.test_rmse, m.test_mae, m.train_loss],
    },
    bytes: {
      series: [line("up (kB)", "kB", BLUE, undefined, kb), line("down (kB)", "kB", GREEN, [6, 4], kb)],
      axes: [{ scale: "kB", label: "kB" }],
      values: (m) => [(m.bytes_up ?? 0) / 1e3, (m.bytes_down ?? 0) / 1e3],
    },
  };

  function size(el) {
    const width = Math.max(240, Math.floor(el.clientWidth || 600));
    return { width, height: Math.round(Math.min(320, Math.max(200, width * 0.45))) };
  }

  function options(kind, el) {
    const k = KINDS[kind];
    return {
      ...size(el),
      scales: { x: { time: false }, "%": { range: [0, 100] } },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [{ label: "round", value: (u, v) => (v == null ? "–" : String(v)) }, ...k.series],
      axes: [
        { label: "round", stroke: "#222", grid: { stroke: "#ddd" }, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] },
        ...k.axes.map((a) => ({ ...a, stroke: "#222", grid: { stroke: "#eee" } })),
      ],
    };
  }

  class RoundChart {
    constructor(el, kind) {
      this.el = el;
      this.kind = kind;
      this.plot = null;
      if (typeof ResizeObserver === "function") {
        new ResizeObserver(() => this.plot && this.plot.setSize(size(this.el))).observe(el);
      }
    }

    // Redraw from the metrics list; ``kind`` may switch between classification and regression.
    update(metrics, kind) {
      const k = KINDS[kind];
      const data = [metrics.map((m) => m.round)];
      k.series.forEach(() => data.push([]));
      for (const m of metrics) k.values(m).forEach((v, i) => data[i + 1].push(v ?? null));
      if (this.plot === null || kind !== this.kind) {
        if (this.plot) this.plot.destroy();
        this.kind = kind;
        this.plot = new root.uPlot(options(kind, this.el), data, this.el);
      } else {
        this.plot.setData(data);
      }
      this.el.dataset.points = String(metrics.length);
      this.el.setAttribute("aria-label", describe(metrics, k));
    }
  }

  function describe(metrics, k) {
    if (metrics.length === 0) return "No rounds yet.";
    const last = metrics[metrics.length - 1];
    const parts = k.values(last).map((v, i) => `${k.series[i].label} ${k.series[i].value(null, v)}`);
    return `${metrics.length} rounds charted; round ${last.round}: ${parts.join(", ")}.`;
  }

  root.fedmqCharts = { RoundChart };
})(window);
