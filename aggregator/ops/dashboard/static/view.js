// Renders the state (state.js) into the page. Text from the broker (device names, reasons,
// hardware strings) only ever goes into textContent, never into markup.
"use strict";

(function (root) {
  const S = root.fedmqState;
  const $ = (id) => document.getElementById(id);

  function text(id, value) {
    const el = $(id);
    if (el.textContent !== value) el.textContent = value;
  }

  function bytes(n) {
    if (n == null) return "–";
    if (n >= 1e6) return `${(n / 1e6).toFixed(2)} MB`;
    return `${(n / 1e3).toFixed(1)} kB`;
  }

  function fixed(v, digits) {
    return v == null ? "–" : Number(v).toFixed(digits);
  }

  // A time the sender stamped (its own clock), as this browser's local time of day.
  function clock(ts) {
    return ts == null ? "–" : new Date(ts * 1000).toLocaleTimeString();
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    return s >= 60 ? `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s` : `${s} s`;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    cells.forEach((c, i) => {
      const td = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) td.scope = "row";
      if (c !== null && typeof c === "object") {
        td.textContent = c.text;
        if (c.cls) td.className = c.cls;
      } else {
        td.textContent = c;
      }
      tr.appendChild(td);
    });
    return tr;
  }

  function fillTable(id, rows) {
    const body = $(id).tBodies[0];
    body.replaceChildren(...rows.map(row));
  }

  function hardware(device) {
    const d = device || {};
    const parts = [];
    if (d.machine) parts.push(d.machine);
    if (d.python) parts.push(`Python ${d.python}`);
    for (const [k, v] of Object.entries(d)) {
      if (k !== "machine" && k !== "python") parts.push(`${k} ${v}`);
    }
    return parts.length ? parts.join(" · ") : "not reported";
  }

  function renderFederation(state) {
    const a = state.aggregator;
    text("fed-name", state.federation);
    text("agg-state", a ? `${a.state}${a.run ? ` (run ${a.run})` : ""}` : "unknown (no status yet)");
    const total = a && a.roundsTotal ? ` of ${a.roundsTotal}` : "";
    const current = state.round ? state.round.round : a && a.round >= 0 ? a.round : null;
    text("agg-round", current == null ? "–" : `${current}${total}`);
    const c = S.agentCounts(state);
    text("device-counts", `${c.online} online, ${c.training} training, ${c.offline} offline`);
    const others = [...state.federations].filter((f) => f !== state.federation).sort();
    const el = $("other-feds");
    el.hidden = others.length === 0;
    text("other-feds", others.length ? `Other federations on this broker: ${others.join(", ")}` : "");
    const list = $("federations");
    if (list.options.length !== state.federations.size) {
      list.replaceChildren(...[...state.federations].sort().map((f) => new Option(f)));
    }
  }

  function renderRound(state, now) {
    const cur = state.round;
    if (cur === null) {
      text("round-summary", "No round announced yet.");
      text("countdown", "–");
      return;
    }
    const what = [cur.arch && `model ${cur.arch}`, cur.codec && `codec ${cur.codec}`, cur.task].filter(Boolean);
    text("round-summary", `Round ${cur.round} (${what.join(", ")}).`);
    const left = S.secondsLeft(cur, now);
    const cd = $("countdown");
    let label;
    if (cur.closed) label = "round closed";
    else if (left < 0) label = `passed ${duration(-left)} ago, waiting for the aggregator`;
    else label = `${cur.retained ? "at most " : ""}${duration(left)} left`;
    text("countdown", label);
    cd.dataset.state = cur.closed ? "closed" : left < 0 ? "overdue" : "open";
    if (cur.retained && !cur.closed) {
      cd.title = "Announced before this page connected: counted from its arrival here";
    }
    const d = state.decision;
    const dec = $("round-decision");
    dec.hidden = d === null;
    text("round-decision", d ? `Decision: ${d.decision}, ${d.accepted} updates${d.reason ? ` (${d.reason})` : ""}` : "");
    const sets = S.roundCounts(state);
    for (const key of ["selected", "training", "reported", "accepted", "rejected"]) {
      text(`n-${key}`, String(sets[key].length));
    }
    const items = ["selected", "training", "reported", "accepted", "rejected"].map((k) => {
      const li = document.createElement("li");
      li.textContent = `${k}: ${sets[k].join(", ") || "none"}`;
      return li;
    });
    $("round-devices").replaceChildren(...items);
  }

  function renderModel(state) {
    const m = state.meta;
    text("model-round", m ? `${m.round}${m.final ? " (final)" : ""}${m.arch ? `, ${m.arch}` : ""}` : "–");
    const hash = $("model-hash");
    text("model-hash", m ? `${m.hash.slice(0, 16)}…` : "–");
    hash.title = m ? m.hash : "";
    text("model-size", m ? bytes(m.nbytes) : "–");
    // The page does not check Ed25519 signatures: it says whether one is there, no more.
    text(
      "model-signature",
      m ? (m.signed ? "signed (signature present; agents verify it, this page does not)" : "unsigned") : "–",
    );
    $("model-signature").dataset.signed = m ? String(m.signed) : "";
  }

  function renderDevices(state) {
    const rows = [...state.agents.entries()].sort(([a], [b]) => (a < b ? -1 : 1)).map(([id, a]) => [
      id,
      { text: a.state, cls: `state-${a.state}` },
      a.round >= 0 ? String(a.round) : "–",
      String(a.samples),
      hardware(a.device),
      clock(a.ts),
      a.skipped ? `skipped: ${a.skipped}` : "",
    ]);
    fillTable("devices", rows);
  }

  function renderReceipts(state) {
    fillTable(
      "receipts",
      state.receipts.map((r) => [
        clock(r.ts),
        String(r.round),
        r.client,
        { text: r.status, cls: `status-${r.status}` },
        r.code || "–",
        r.reason || "",
      ]),
    );
  }

  function renderRounds(state) {
    const last = state.metrics[state.metrics.length - 1];
    const regression = last && last.task === "regression";
    text("rounds-quality", regression ? "Test RMSE" : "Test accuracy");
    fillTable(
      "rounds",
      state.metrics.map((m) => [
        String(m.round),
        String(m.accepted),
        regression ? fixed(m.test_rmse, 4) : m.test_accuracy == null ? "–" : `${(100 * m.test_accuracy).toFixed(2)} %`,
        fixed(m.test_loss, 4),
        fixed(m.train_loss, 4),
        bytes(m.bytes_up),
        bytes(m.bytes_down),
        m.round_time_s == null ? "–" : `${m.round_time_s.toFixed(1)} s`,
      ]),
    );
  }

  function renderProblems(state) {
    $("problems-panel").hidden = state.problems.length === 0;
    $("problems").replaceChildren(
      ...state.problems.map((p) => {
        const li = document.createElement("li");
        li.textContent = p;
        return li;
      }),
    );
  }

  let drawnMetrics = -1;

  // Everything but the charts is cheap; the tables and charts of rounds only change with
  // the metrics.
  function render(state, now, charts) {
    renderFederation(state);
    renderRound(state, now);
    renderModel(state);
    renderDevices(state);
    renderReceipts(state);
    renderProblems(state);
    if (charts && state.metricsVersion !== drawnMetrics) {
      drawnMetrics = state.metricsVersion;
      const last = state.metrics[state.metrics.length - 1];
      const task = last && last.task === "regression" ? "regression" : "classification";
      charts.quality.update(state.metrics, task);
      charts.bytes.update(state.metrics, "bytes");
      text("quality-title", task === "regression" ? "Test RMSE, MAE and loss per round" : "Accuracy and loss per round");
      renderRounds(state);
    }
  }

  function resetCharts() {
    drawnMetrics = -1;
  }

  root.fedmqView = { render, resetCharts };
})(window);
