// What the dashboard knows about one federation, folded in one MQTT message at a time.
//
// The browser twin of aggregator/ops/monitor_view.py's MonitorState, with the same topic
// semantics (shared/protocol/topics.py) and message fields (shared/protocol/messages.py).
// Pure: no DOM, no MQTT, no clock. The caller passes `now`, a monotonic time in
// milliseconds (performance.now()), used only for durations measured in this browser.
"use strict";

(function (root) {
  const PROTOCOL = "fl/v1";
  const SCHEMA = 1;
  const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
  const ROUND = /^(0|[1-9][0-9]{0,8})$/;
  const MAX_RECEIPTS = 20;
  const MAX_ROUNDS = 1000;
  const MAX_PROBLEMS = 5;
  const decoder = new TextDecoder("utf-8", { fatal: true });

  // The topic filters the page subscribes to: small JSON control messages only. Never the
  // global model, delta or ONNX frames, never updates, never chunks, and never "#".
  function subscriptions(federation) {
    const r = `${PROTOCOL}/${federation}`;
    return [
      `${PROTOCOL}/+/aggregator/status`, // also lists the broker's other federations
      `${r}/global/meta`,
      `${r}/metrics`,
      `${r}/round/+/start`,
      `${r}/round/+/decision`,
      `${r}/round/+/receipt/+`,
      `${r}/agents/+/status`,
    ];
  }

  // {federation, kind, round, client} for the topics above; null for any other topic.
  function parseTopic(topic) {
    const p = topic.split("/");
    if (p.length < 4 || `${p[0]}/${p[1]}` !== PROTOCOL || !NAME.test(p[2])) return null;
    const fed = p[2];
    const rest = p.slice(3);
    const key = rest.join("/");
    if (key === "aggregator/status") return { federation: fed, kind: "aggregator_status" };
    if (key === "global/meta") return { federation: fed, kind: "global_meta" };
    if (key === "metrics") return { federation: fed, kind: "metrics" };
    if (rest.length === 3 && rest[0] === "agents" && rest[2] === "status" && NAME.test(rest[1])) {
      return { federation: fed, kind: "agent_status", client: rest[1] };
    }
    if (rest[0] !== "round" || !ROUND.test(rest[1] || "")) return null;
    const round = Number(rest[1]);
    if (rest.length === 3 && rest[2] === "start") return { federation: fed, kind: "round_start", round };
    if (rest.length === 3 && rest[2] === "decision") return { federation: fed, kind: "decision", round };
    if (rest.length === 4 && rest[2] === "receipt" && NAME.test(rest[3])) {
      return { federation: fed, kind: "receipt", round, client: rest[3] };
    }
    return null;
  }

  class MessageError extends Error {}

  // Checks one field the way msgspec does on the Python side, naming it when it is wrong.
  function field(obj, name, type, optional) {
    const v = obj[name];
    if (v === undefined || v === null) {
      if (optional) return undefined;
      throw new MessageError(`missing field ${name}`);
    }
    const ok = type === "array" ? Array.isArray(v) : type === "object" ? typeof v === "object" && !Array.isArray(v) : typeof v === type;
    if (!ok) throw new MessageError(`field ${name} is not a ${type}`);
    return v;
  }

  function decode(payload, kind) {
    let obj;
    try {
      obj = JSON.parse(decoder.decode(payload));
    } catch (e) {
      throw new MessageError(`invalid ${kind}: not UTF-8 JSON`);
    }
    if (typeof obj !== "object" || obj === null || Array.isArray(obj)) {
      throw new MessageError(`invalid ${kind}: not a JSON object`);
    }
    if ((obj.schema ?? SCHEMA) !== SCHEMA) {
      throw new MessageError(`invalid ${kind}: schema ${obj.schema} (this page reads ${SCHEMA})`);
    }
    return obj;
  }

  function signed(obj) {
    return Boolean(obj.signature_v2 || obj.signature);
  }

  function newState(federation) {
    return {
      federation,
      federations: new Set(),
      aggregator: null, // {state, round, roundsTotal, run, signed}
      round: null, // see onRoundStart
      decision: null, // the last RoundDecision of the current round
      agents: new Map(), // client id -> {state, round, samples, device, skipped, ts, retained}
      receipts: [], // newest first
      metrics: [], // RoundMetrics, by round
      metricsVersion: 0, // bumped when metrics change (the charts redraw only then)
      meta: null, // {round, hash, nbytes, signed, final, run, arch}
      problems: [],
    };
  }

  function apply(state, topic, payload, retained, now) {
    const t = parseTopic(topic);
    if (t === null) {
      note(state, `${topic}: not a topic this page subscribes to`);
      return;
    }
    try {
      if (t.kind === "aggregator_status") state.federations.add(t.federation);
      if (t.federation !== state.federation) return;
      applyParsed(state, t, payload, retained, now);
    } catch (e) {
      if (!(e instanceof MessageError)) throw e;
      note(state, `${topic}: ${e.message}`);
    }
  }

  function note(state, problem) {
    state.problems.push(problem);
    if (state.problems.length > MAX_PROBLEMS) state.problems.shift();
  }

  function applyParsed(state, t, payload, retained, now) {
    if (t.kind === "round_start") return onRoundStart(state, t.round, payload, retained, now);
    if (payload.length === 0) {
      // A cleared retained message: a removed device (the others are never cleared).
      if (t.kind === "agent_status") state.agents.delete(t.client);
      return;
    }
    const handlers = {
      aggregator_status: onAggregatorStatus,
      agent_status: onAgentStatus,
      receipt: onReceipt,
      decision: onDecision,
      metrics: onMetrics,
      global_meta: onGlobalMeta,
    };
    handlers[t.kind](state, decode(payload, t.kind), retained, now);
  }

  function onAggregatorStatus(state, m) {
    state.aggregator = {
      state: field(m, "state", "string"),
      round: field(m, "round", "number", true) ?? -1,
      roundsTotal: field(m, "rounds_total", "number", true) ?? 0,
      run: field(m, "run", "number", true) ?? 0,
      signed: signed(m),
    };
  }

  function onAgentStatus(state, m, retained) {
    const id = field(m, "client_id", "string");
    state.agents.set(id, {
      state: field(m, "state", "string"),
      round: field(m, "round", "number", true) ?? -1,
      samples: field(m, "num_samples", "number", true) ?? 0,
      device: field(m, "device", "object", true) ?? {},
      skipped: field(m, "skipped", "string", true) ?? "",
      ts: field(m, "ts", "number", true) ?? null,
      retained,
    });
  }

  // The countdown uses deadline - ts (both the aggregator's clock) counted from the arrival
  // on this browser's monotonic clock, as the agents do (edge_agent/announcements.py):
  // never the aggregator's deadline against this machine's wall clock, which may be off.
  function onRoundStart(state, round, payload, retained, now) {
    const cur = state.round;
    if (payload.length === 0) {
      // The aggregator clears a round's retained announcement when the round closes.
      if (cur !== null && cur.round === round) cur.closed = true;
      return;
    }
    const m = decode(payload, "round_start");
    const ts = field(m, "ts", "number");
    const seconds = field(m, "deadline", "number") - ts;
    const model = field(m, "model", "object", true) ?? {};
    if (cur !== null && cur.round === round) {
      // A re-announcement (an extended deadline), or the same one again after a reconnect:
      // keep the receipts, and the arrival time unless it is a new announcement.
      if (cur.ts !== ts) Object.assign(cur, { ts, seconds, arrivedAt: now, retained });
      cur.selected = field(m, "selected", "array");
      cur.closed = false;
      return;
    }
    state.round = {
      round,
      ts,
      seconds,
      arrivedAt: now,
      retained, // announced before the page subscribed: the countdown is an upper bound
      selected: field(m, "selected", "array"),
      codec: field(m, "codec", "string", true) ?? "",
      arch: typeof model.arch === "string" ? model.arch : "",
      task: model.task === "regression" ? "regression" : "classification",
      signed: signed(m),
      accepted: new Set(),
      rejected: new Map(),
      closed: false,
    };
    state.decision = null;
  }

  function onDecision(state, m) {
    const round = field(m, "round", "number");
    if (state.round === null || state.round.round !== round) return;
    state.decision = {
      decision: field(m, "decision", "string"),
      accepted: field(m, "accepted", "number", true) ?? 0,
      reason: field(m, "reason", "string", true) ?? "",
    };
  }

  function onReceipt(state, m) {
    const r = {
      round: field(m, "round", "number"),
      client: field(m, "client_id", "string"),
      status: field(m, "status", "string"),
      code: field(m, "code", "string", true) ?? "",
      reason: field(m, "reason", "string", true) ?? "",
      ts: field(m, "ts", "number", true) ?? null,
    };
    state.receipts.unshift(r);
    if (state.receipts.length > MAX_RECEIPTS) state.receipts.pop();
    const cur = state.round;
    if (cur === null || cur.round !== r.round) return;
    if (r.status === "accepted") {
      cur.accepted.add(r.client);
      cur.rejected.delete(r.client);
    } else {
      cur.rejected.set(r.client, r);
    }
  }

  // RoundMetrics fields the charts and the table read: numbers, or null when not measured.
  const METRIC_NUMBERS = [
    "train_loss", "test_accuracy", "test_loss", "test_rmse", "test_mae",
    "bytes_up", "bytes_down", "round_time_s",
  ];

  function onMetrics(state, m) {
    const round = field(m, "round", "number");
    field(m, "accepted", "number");
    METRIC_NUMBERS.forEach((name) => field(m, name, "number", true));
    field(m, "task", "string", true);
    const kept = state.metrics.filter((h) => h.round !== round);
    kept.push(m);
    kept.sort((a, b) => a.round - b.round);
    state.metrics = kept.slice(-MAX_ROUNDS);
    state.metricsVersion += 1;
  }

  function onGlobalMeta(state, m) {
    const model = field(m, "model", "object", true) ?? {};
    state.meta = {
      round: field(m, "round", "number"),
      hash: field(m, "model_hash", "string"),
      nbytes: field(m, "nbytes", "number", true) ?? 0,
      final: Boolean(m.final),
      run: field(m, "run", "number", true) ?? 0,
      arch: typeof model.arch === "string" ? model.arch : "",
      signed: signed(m),
    };
  }

  // Seconds the current round has left by this browser's monotonic clock (may be < 0).
  function secondsLeft(round, now) {
    return round.seconds - (now - round.arrivedAt) / 1000;
  }

  // Devices of the current round: selected, training now, reported (an update received and
  // answered: accepted or rejected), accepted, rejected.
  function roundCounts(state) {
    const cur = state.round;
    if (cur === null) return null;
    const training = [...state.agents.entries()].filter(
      ([, a]) => a.state === "training" && a.round === cur.round,
    ).map(([id]) => id);
    return {
      selected: cur.selected.slice().sort(),
      training: training.sort(),
      reported: [...new Set([...cur.accepted, ...cur.rejected.keys()])].sort(),
      accepted: [...cur.accepted].sort(),
      rejected: [...cur.rejected.keys()].sort(),
    };
  }

  function agentCounts(state) {
    const out = { online: 0, training: 0, offline: 0 };
    for (const a of state.agents.values()) out[a.state] = (out[a.state] || 0) + 1;
    return out;
  }

  root.fedmqState = {
    PROTOCOL,
    NAME,
    subscriptions,
    parseTopic,
    newState,
    apply,
    secondsLeft,
    roundCounts,
    agentCounts,
  };
})(typeof window !== "undefined" ? window : globalThis);
