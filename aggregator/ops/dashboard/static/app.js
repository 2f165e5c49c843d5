// The page's shell: the login form, the MQTT-over-WebSockets connection (MQTT.js) and the
// render loop. It connects to the broker that served it: on the same port, or, on a
// provisioned broker, on the wss port that the config.json `fedmq broker init` wrote beside
// it names. Always the page's own host: neither a link nor a config can send the password
// to another machine.
//
// URL parameters: ?federation=NAME fills the form; &connect=1 connects at once without
// credentials (the development broker; `fedmq demo` prints such a URL).
"use strict";

(function (root) {
  const S = root.fedmqState;
  const V = root.fedmqView;
  const $ = (id) => document.getElementById(id);
  // CONNACK reason codes of a refused login: MQTT 5 (134 bad user name or password,
  // 135 not authorized) and MQTT 3.1.1 (4, 5).
  const LOGIN_REFUSED = new Set([134, 135, 4, 5]);
  const RECONNECT_MS = 2000;

  let config = {}; // config.json: {wss_port, federation}
  const configLoaded = loadConfig();
  let client = null;
  let state = null;
  let charts = null;
  let drawPending = false;

  function setStatus(kind, message) {
    const el = $("connection");
    el.dataset.state = kind;
    el.textContent = message;
    document.body.dataset.connection = kind;
  }

  function brokerUrl() {
    const port = Number(config.wss_port);
    if (Number.isInteger(port) && port > 0 && port < 65536) {
      return `wss://${location.hostname}:${port}/mqtt`;
    }
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.host}/mqtt`;
  }

  async function loadConfig() {
    try {
      const res = await fetch("config.json", { cache: "no-cache" });
      if (res.ok) config = await res.json();
    } catch (e) {
      config = {}; // the development broker has none: same origin
    }
  }

  function draw() {
    drawPending = false;
    if (state !== null) V.render(state, performance.now(), charts);
  }

  function schedule() {
    if (!drawPending) {
      drawPending = true;
      requestAnimationFrame(draw);
    }
  }

  function stop() {
    if (client !== null) {
      const old = client;
      client = null;
      old.removeAllListeners();
      old.on("error", () => {}); // an error while closing must not be reported as unhandled
      old.end(true);
    }
    $("disconnect").disabled = true;
  }

  function refusal(err) {
    const code = err && typeof err.code === "number" ? err.code : null;
    return code !== null && LOGIN_REFUSED.has(code) ? code : null;
  }

  function subscribe(c, federation, url, who) {
    const filters = S.subscriptions(federation);
    c.subscribe(filters, { qos: 1 }, (err, granted) => {
      if (c !== client) return;
      const denied = (granted || []).filter((g) => g.qos >= 128).map((g) => g.topic);
      if (err || denied.length) {
        setStatus("error", `Connected, but the broker refused the subscriptions: ${err ? err.message : denied.join(", ")}`);
      } else {
        setStatus("connected", `Connected to ${url}${who}; federation ${federation}.`);
      }
    });
  }

  async function connect(event) {
    if (event) event.preventDefault();
    await configLoaded;
    const form = $("login");
    if (!form.reportValidity()) return;
    stop();
    setStatus("connecting", "Loading the page's libraries…");
    try {
      await root.fedmqVendor;
    } catch (e) {
      setStatus("error", `The page could not load its libraries: ${e.message}`);
      return;
    }
    const federation = $("federation").value.trim() || config.federation || "default";
    const username = $("username").value.trim();
    const password = $("password").value;
    try {
      localStorage.setItem("fedmq.dashboard.federation", federation);
      localStorage.setItem("fedmq.dashboard.username", username);
    } catch (e) {
      // Storage may be disabled (private windows): the form just starts empty next time.
    }
    if (charts === null) {
      charts = {
        quality: new root.fedmqCharts.RoundChart($("quality-chart"), "classification"),
        bytes: new root.fedmqCharts.RoundChart($("bytes-chart"), "bytes"),
      };
    }
    state = S.newState(federation);
    V.resetCharts();
    draw();
    openConnection(federation, username, password);
  }

  function openConnection(federation, username, password) {
    const url = brokerUrl();
    const who = username ? ` as ${username}` : "";
    let attempts = 0;
    setStatus("connecting", `Connecting to ${url}${who}…`);
    const c = root.mqtt.connect(url, {
      protocolVersion: 5,
      clean: true,
      // A provisioned broker replaces the client id by the login (use_username_as_clientid).
      clientId: `fedmq-dashboard-${Math.random().toString(16).slice(2, 10)}`,
      username: username || undefined,
      password: password || undefined,
      reconnectPeriod: RECONNECT_MS,
      connectTimeout: 10000,
      keepalive: 30,
      resubscribe: false, // subscribed again on every connect, below
    });
    client = c;
    $("disconnect").disabled = false;
    c.on("connect", () => {
      attempts = 0;
      setStatus("connected", `Connected to ${url}${who}; subscribing…`);
      subscribe(c, federation, url, who);
    });
    c.on("reconnect", () => {
      attempts += 1;
      setStatus("reconnecting", `Connection lost; reconnecting to ${url} (attempt ${attempts})…`);
    });
    c.on("close", () => {
      if (c === client && $("connection").dataset.state !== "refused") {
        setStatus("reconnecting", `Connection lost; reconnecting to ${url} every ${RECONNECT_MS / 1000} s…`);
      }
    });
    c.on("error", (err) => {
      const code = refusal(err);
      if (code === null) return; // transport errors end in "close", and MQTT.js retries
      setStatus(
        "refused",
        `The broker refused the login${who} (bad username or password; reason code ${code}). ` +
          "Check the username and password, then connect again.",
      );
      stop();
    });
    c.on("message", (topic, payload, packet) => {
      if (c !== client) return;
      S.apply(state, topic, payload, Boolean(packet.retain), performance.now());
      schedule();
    });
  }

  function disconnect() {
    stop();
    setStatus("idle", "Disconnected.");
  }

  function init() {
    const params = new URLSearchParams(location.search);
    let saved = {};
    try {
      saved = {
        federation: localStorage.getItem("fedmq.dashboard.federation"),
        username: localStorage.getItem("fedmq.dashboard.username"),
      };
    } catch (e) {
      saved = {};
    }
    $("federation").value = params.get("federation") || saved.federation || "";
    $("username").value = saved.username || "";
    $("login").addEventListener("submit", connect);
    $("disconnect").addEventListener("click", disconnect);
    setInterval(() => state && state.round && !state.round.closed && schedule(), 1000);
    configLoaded.then(() => {
      if (!$("federation").value) $("federation").value = config.federation || "default";
      $("broker-url").textContent = brokerUrl();
      if (params.get("connect") === "1") connect(null);
    });
  }

  // For the browser tests and for people debugging in the console.
  root.fedmqDashboard = { state: () => state, connected: () => client !== null && client.connected };
  init();
})(window);
