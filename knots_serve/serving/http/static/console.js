// The operator console: five views over the admin API (docs/CONSOLE.md). Every request carries the admin
// key from session storage as a bearer header; server data reaches the page as text nodes only.
"use strict";

const KEY = "knots-admin-key", API_KEY = "knots-api-key"; // the API key: only where inference needs one
const $ = (sel, root = document) => root.querySelector(sel);
const COLORS = ["#2a6fdb", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285"];

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}
const num = (v, digits = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const bytes = (n) => (n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : (n / 1024).toFixed(1) + " KiB");
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");

function say(message, error = false) {
  const status = $("#status");
  status.textContent = message;
  status.className = error ? "error" : "";
}

// an error body's message: ours and vLLM's are {"error": {"message"}}, vLLM's key check {"error": "Unauthorized"}
function problem(doc, status) {
  const e = doc?.error;
  return (typeof e === "string" ? e : e?.message) || doc?.detail || `HTTP ${status}`;
}

// --- the admin API -------------------------------------------------------------------------------------
async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(KEY) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const doc = await r.json().catch(() => null);
  if (r.status === 401 || r.status === 403) logout(problem(doc, r.status));
  if (!r.ok) throw new Error(problem(doc, r.status));
  return doc;
}

// inference (the playground): the API key, if the operator gave one; the admin key is no API key
function inferenceHeaders(extra = {}) {
  const key = sessionStorage.getItem(API_KEY);
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

// runs an action from a button or form: its error goes to the status line, and the view is read again
async function act(what, fn) {
  say(what + " …");
  try {
    const result = await fn();
    say(what + ": done");
    return result;
  } catch (e) {
    say(what + ": " + e.message, true);
  } finally {
    refresh();
  }
}

// --- login, tabs, refresh ------------------------------------------------------------------------------
function logout(reason) {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(API_KEY);
  $("main").hidden = $("#tabs").hidden = $("#logout").hidden = true;
  $("#login").hidden = false;
  // nothing read with the key stays in the page
  for (const node of document.querySelectorAll("main tbody, #basis, #answers, #experiment-list, #tune-report, " +
    "#recipes-path, #composing, #cache-use, #pin-progress, #model-ids")) node.replaceChildren();
  for (const name of Object.keys(cards)) (cards[name].charts.forEach((u) => u.destroy()), delete cards[name]);
  $("#pinned").textContent = "none";
  if (reason) say(reason, true);
}

$("#login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("#key").value);
  if ($("#api-key").value) sessionStorage.setItem(API_KEY, $("#api-key").value);
  $("#key").value = $("#api-key").value = "";
  try {
    await api("GET", "/admin/store");
  } catch (e) {
    return logout(e.message);
  }
  say("");
  enter();
});
$("#logout").addEventListener("click", () => logout());

function enter() {
  $("#login").hidden = true;
  $("main").hidden = $("#tabs").hidden = $("#logout").hidden = false;
  show();
}

const VIEWS = {}; // section id -> async function that reads and draws it
let timer = null;

function current() {
  return (location.hash || "#pool").slice(1) in VIEWS ? (location.hash || "#pool").slice(1) : "pool";
}

let reading = null; // the read under way: the timer and an action never draw a view twice at once

function refresh() {
  if (!sessionStorage.getItem(KEY) || reading) return reading;
  const view = current();
  reading = VIEWS[view]()
    .catch((e) => sessionStorage.getItem(KEY) && say(`${view}: ${e.message}`, true))
    .finally(() => (reading = null));
  return reading;
}

function show() {
  const view = current();
  for (const s of document.querySelectorAll("main > section")) s.classList.toggle("shown", s.id === view);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.hash === "#" + view);
  clearInterval(timer);
  timer = setInterval(refresh, 3000); // what changes on its own: merges, experiments' numbers
  refresh();
}
window.addEventListener("hashchange", show);

// --- Pool ----------------------------------------------------------------------------------------------
VIEWS.pool = async () => {
  const doc = await api("GET", "/admin/tasks");
  const b = doc.basis;
  $("#basis").textContent =
    `${doc.tasks.length} tasks; shared basis ${b.fingerprint || "(none)"}: ${bytes(b.bytes)}; ` +
    `on the compose device in all: ${bytes(b.resident_bytes)}`;
  $("#tasks tbody").replaceChildren(
    ...doc.tasks.map((t) => {
      const remove = el("button", { textContent: "Remove" });
      remove.onclick = () =>
        confirm(`Remove task ${t.name}? Merges using it stop being served.`) &&
        act(`remove ${t.name}`, () => api("DELETE", "/admin/tasks/" + encodeURIComponent(t.name)));
      return el("tr", {}, el("td", {}, t.name), el("td", {}, t.model), el("td", {}, t.ranks.join(", ")),
        el("td", { className: "num" }, t.modules), el("td", {}, t.source),
        el("td", { className: "num" }, bytes(t.bytes)),
        el("td", { title: t.stats ? t.stats.file : "knots-serve stats measures them" },
          t.stats ? `${t.stats.tokens} tokens (${t.stats.examples} examples)` : "none"),
        el("td", {}, remove));
    }),
  );
};

$("#add-task").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  act(`add ${f.get("name")}`, () => api("POST", "/admin/tasks", { name: f.get("name"), path: f.get("path") }));
});

// --- Merges --------------------------------------------------------------------------------------------
VIEWS.merges = async () => {
  const [doc, pin] = await Promise.all([api("GET", "/admin/merges"), api("GET", "/admin/pin")]);
  drawPin(pin);
  $("#composing").textContent = doc.composing.length ? doc.composing.join(", ") : "nothing";
  $("#cache-use").textContent = `${bytes(doc.cache_bytes)} of ${bytes(doc.cache_limit)}`;
  $("#cached tbody").replaceChildren(
    ...doc.merges.map((m) => {
      const pinIt = el("button", { textContent: "Pin" });
      pinIt.onclick = () => pinMerge(m.model);
      return el("tr", {}, el("td", {}, m.model), el("td", { className: "num" }, bytes(m.bytes)),
        el("td", { className: "num" }, m.rank), el("td", { className: "num" }, m.hits),
        el("td", { className: "num" }, num(m.compose_s)), el("td", {}, when(m.last_used)),
        el("td", { className: "num" }, m.in_use), el("td", {}, m.why), el("td", {}, m.source), el("td", {}, pinIt));
    }),
  );
  const hot = Array.isArray(doc.hot) ? doc.hot : [];
  $("#hot tbody").replaceChildren(
    ...hot.map((h) => el("tr", {}, el("td", {}, h.model), el("td", { className: "num" }, h.recent_requests))),
  );
};

function drawPin(pin) {
  $("#pinned").textContent = pin.pinned ? pin.pinned.model : "none";
  $("#unpin").hidden = !pin.pinned;
  const p = pin.pending;
  $("#pin-progress").textContent = p
    ? `${p.model ? "pinning " + p.model : "unpinning"}: ${p.phase}` +
      (p.phase === "draining" ? ` (${p.in_flight} request(s) in flight)` : "")
    : "";
}

// a pin or unpin, with its phases shown as they happen (GET /admin/pin while it runs)
async function swap(what, request) {
  const watch = setInterval(() => api("GET", "/admin/pin").then(drawPin, () => {}), 200);
  try {
    await act(what, request);
  } finally {
    clearInterval(watch);
  }
}
const pinMerge = (model) => swap(`pin ${model}`, () => api("POST", "/admin/pin", { model }));
$("#unpin").addEventListener("click", () => swap("unpin", () => api("DELETE", "/admin/pin")));
$("#pin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  pinMerge(new FormData(ev.target).get("model"));
});

// --- Playground ----------------------------------------------------------------------------------------
function modelInput(value = "") {
  const row = el("div", { className: "model-row" });
  const input = el("input", { name: "model", size: 50, value, placeholder: "tasks:A+B@knots-ties, a recipe, an adapter" });
  input.setAttribute("list", "model-ids");
  const drop = el("button", { type: "button", textContent: "×", title: "remove" });
  drop.onclick = () => row.remove();
  row.append(el("label", {}, "Model ", input), drop);
  $("#play-models").append(row);
}
$("#add-model").addEventListener("click", () => {
  if (document.querySelectorAll("#play-models input").length < 4) modelInput();
});
modelInput();
modelInput();

VIEWS.playground = async () => {
  if ($("#model-ids").childElementCount) return; // read once per page
  const r = await fetch("/v1/models", { headers: inferenceHeaders() });
  const doc = await r.json().catch(() => null);
  if (!r.ok) throw new Error(`the model list: ${problem(doc, r.status)} (log in with the API key too)`);
  $("#model-ids").replaceChildren(...doc.data.map((m) => el("option", { value: m.id })));
};

$("#play").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const messages = [...(f.get("system") ? [{ role: "system", content: f.get("system") }] : []),
    { role: "user", content: f.get("prompt") }];
  const options = { max_tokens: Number(f.get("max_tokens")), temperature: Number(f.get("temperature")) };
  const models = f.getAll("model").map((m) => m.trim()).filter(Boolean);
  $("#answers").replaceChildren();
  for (const model of models) stream(model, messages, options);
});

// one model's answer, streamed into its own column: what served it, tokens, TTFT and total time
async function stream(model, messages, options) {
  const box = el("div", { className: "answer" }, el("h4", {}, model), el("div", { className: "text" }),
    el("div", { className: "meta" }, "waiting …"));
  box.dataset.model = model;
  $("#answers").append(box);
  const text = $(".text", box), meta = $(".meta", box);
  const t0 = performance.now();
  let first = null, tokens = 0, servedBy = model;
  const fail = (message) => {
    box.classList.add("failed");
    meta.replaceChildren(el("span", { className: "error" }, message));
  };
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: inferenceHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, messages, ...options, stream: true, stream_options: { include_usage: true } }),
    });
    if (!r.ok) {
      const doc = await r.json().catch(() => null);
      return fail(`HTTP ${r.status}: ${problem(doc, r.status)}`);
    }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let held = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      held += value;
      const events = held.split("\n\n");
      held = events.pop();
      for (const line of events.flatMap((e) => e.split("\n"))) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) return fail(chunk.error.message);
        servedBy = chunk.model + (chunk.knots ? ` (experiment ${chunk.knots.experiment}, arm ${chunk.knots.arm})` : "");
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) {
          first ??= performance.now();
          text.textContent += piece;
        }
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
      }
      meta.textContent = `streaming … ${((performance.now() - t0) / 1000).toFixed(2)} s`;
    }
  } catch (e) {
    return fail(e.message);
  }
  const end = performance.now();
  box.dataset.servedBy = servedBy;
  meta.textContent = `served by ${servedBy} · ${tokens} tokens · TTFT ${first ? ((first - t0) / 1000).toFixed(3) : "–"} s` +
    ` · ${((end - t0) / 1000).toFixed(3)} s`;
  box.classList.add("done");
}

// --- Experiments ---------------------------------------------------------------------------------------
const cards = {}; // experiment name -> {card, charts, arms}

VIEWS.experiments = async () => {
  const all = await api("GET", "/admin/experiments");
  for (const name of Object.keys(cards)) if (!(name in all)) (cards[name].card.remove(), delete cards[name]);
  for (const name of Object.keys(all).sort()) {
    const report = await api("GET", `/admin/experiments/${encodeURIComponent(name)}/report?history=true`);
    drawExperiment(name, report);
  }
  $("#experiment-list").dataset.count = Object.keys(all).length;
};

function drawExperiment(name, report) {
  let c = cards[name];
  if (!c) {
    const card = $("#experiment-card").content.firstElementChild.cloneNode(true);
    card.dataset.name = name;
    $("h3", card).textContent = name;
    $(".save-weights", card).onclick = () => {
      const weights = {};
      for (const input of card.querySelectorAll("input.weight")) weights[input.dataset.arm] = Number(input.value);
      act(`weights of ${name}`, () => api("PATCH", `/admin/experiments/${encodeURIComponent(name)}/weights`, weights))
        .then((saved) => saved && card.querySelectorAll("input.weight").forEach((i) => delete i.dataset.dirty));
    };
    $(".promote", card).onclick = () =>
      act(`promote ${name}`, async () => {
        const r = await api("POST", `/admin/experiments/${encodeURIComponent(name)}/promote`);
        $(".promote-state", card).textContent = `promoted: ${r.model} is now the recipe of its subset`;
      });
    $(".delete", card).onclick = () =>
      confirm(`Delete experiment ${name}?`) &&
      act(`delete ${name}`, () => api("DELETE", `/admin/experiments/${encodeURIComponent(name)}`));
    $("#experiment-list").append(card);
    c = cards[name] = { card, charts: [], arms: "" };
  }
  const { card } = c;
  const arms = Object.keys(report.arms).sort();
  const typed = Object.fromEntries([...card.querySelectorAll("input.weight")].filter((i) => i.dataset.dirty)
    .map((i) => [i.dataset.arm, i.value]));
  $(".arms tbody", card).replaceChildren(
    ...arms.map((arm) => {
      const a = report.arms[arm], fb = a.feedback;
      const weight = el("input", { className: "weight", type: "number", min: 0, step: "any", value: typed[arm] ?? a.weight });
      weight.dataset.arm = arm;
      if (arm in typed) weight.dataset.dirty = "1";
      weight.oninput = () => (weight.dataset.dirty = "1");
      const ci = fb.ci95 ? ` [${num(fb.ci95[0])}, ${num(fb.ci95[1])}]` : "";
      return el("tr", { className: "arm" }, el("td", {}, arm), el("td", {}, a.model), el("td", {}, weight),
        el("td", { className: "num served" }, a.served), el("td", { className: "num" }, a.errors),
        el("td", { className: "num" }, `${num(a.ttft_s.p50)} / ${num(a.ttft_s.p99)}`),
        el("td", { className: "num" }, `${num(a.latency_s.p50)} / ${num(a.latency_s.p99)}`),
        el("td", { className: "num" }, fb.n), el("td", { className: "num feedback" }, num(fb.mean) + ci));
    }),
  );
  const promote = $(".promote", card), state = $(".promote-state", card);
  promote.disabled = !report.promotable.ok;
  if (!state.textContent.startsWith("promoted")) {
    state.textContent = report.promotable.ok ? `ready: promotes ${report.promotable.model}` : report.promotable.reason;
    state.className = "promote-state" + (report.promotable.ok ? " ok" : "");
  }
  drawCharts(c, arms, report.history);
}

// per arm over time (this server's reports, every few seconds): [title, the series each arm draws (the
// first solid, the others dashed), their values in one report row]
const CHARTS = [
  ["mean feedback (band: 95% interval)", ["mean", "low", "high"],
    (a) => [a.feedback.mean, ...(a.feedback.ci95 || [null, null])]],
  ["requests served (dashed: errors)", ["served", "errors"], (a) => [a.served, a.errors]],
  ["TTFT p50 (dashed: p99), s", ["p50", "p99"], (a) => [a.ttft_s.p50, a.ttft_s.p99]],
  ["latency p50 (dashed: p99), s", ["p50", "p99"], (a) => [a.latency_s.p50, a.latency_s.p99]],
];

function drawCharts(c, arms, history) {
  if (c.arms !== arms.join()) { // new arms: new charts, and the arms' colours above them
    c.charts.forEach((u) => u.destroy());
    $(".legend", c.card).replaceChildren(...arms.map((arm, i) =>
      el("span", {}, el("b", { style: `color: ${COLORS[i % COLORS.length]}` }, "■ "), arm, "  ")));
    c.charts = CHARTS.map(([title, names]) => {
      const series = [{}], bands = [];
      arms.forEach((arm, i) => {
        const color = COLORS[i % COLORS.length];
        names.forEach((name, j) => series.push({
          label: `${arm} ${name}`, stroke: color, dash: j ? [4, 4] : undefined, width: j ? 1 : 2, spanGaps: true,
        }));
        if (names.length === 3) bands.push({ series: [series.length - 1, series.length - 2], fill: color + "22" });
      });
      const chart = new uPlot({ title, width: 440, height: 200, scales: { x: { time: true } }, series, bands,
        legend: { show: false } }, [[]], $(".charts", c.card));
      chart.root.dataset.title = title;
      return chart;
    });
    c.arms = arms.join();
  }
  const t = history.map((h) => h.t);
  CHARTS.forEach(([, names, values], k) => {
    const columns = arms.flatMap((arm) => names.map((_, j) =>
      history.map((h) => (h.arms[arm] ? values(h.arms[arm])[j] ?? null : null))));
    c.charts[k].setData([t, ...columns]);
    c.charts[k].root.dataset.points = t.length;
  });
}

function armRow(arm = "", model = "", weight = 1) {
  const row = el("div", { className: "arm-row" },
    el("label", {}, "arm ", el("input", { name: "arm", value: arm, required: true, size: 10 })),
    el("label", {}, "model ", el("input", { name: "arm-model", value: model, required: true, size: 40 })),
    el("label", {}, "weight ", el("input", { name: "arm-weight", type: "number", min: 0, step: "any", value: weight })));
  $("input[name=arm-model]", row).setAttribute("list", "model-ids");
  $("#new-arms").append(row);
}
armRow("a");
armRow("b");
$("#add-arm").addEventListener("click", () => armRow());
$("#new-experiment").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target), arms = {};
  f.getAll("arm").forEach((arm, i) => (arms[arm] = { model: f.getAll("arm-model")[i], weight: Number(f.getAll("arm-weight")[i]) }));
  act(`create ${f.get("name")}`, () => api("POST", "/admin/experiments", { name: f.get("name"), arms }));
});

// --- Recipes -------------------------------------------------------------------------------------------
VIEWS.recipes = async () => {
  const [doc, report] = await Promise.all([api("GET", "/admin/recipes"), api("GET", "/admin/recipes/report")]);
  $("#recipes-path").textContent = `Recipes in ${doc.path}` + (doc.error ? ` — not reloaded: ${doc.error}` : "");
  $("#recipe-table tbody").replaceChildren(
    ...doc.recipes.map((r) => el("tr", {}, el("td", {}, r.tasks.join("+")), el("td", {}, r.model),
      el("td", { className: "num" }, num(r.score)), el("td", { className: "num" }, num(r.default_score)),
      el("td", {}, r.source), el("td", {}, r.date))),
  );
  $("#rule-table tbody").replaceChildren(
    ...Object.entries(doc.rule).map(([n, rule]) => el("tr", {}, el("td", {}, n),
      el("td", {}, rule.method), el("td", {}, JSON.stringify(rule.params)))),
  );
  const out = $("#tune-report");
  if (!report.markdown) {
    out.replaceChildren(el("p", {}, `No tuning report in ${report.path}: \`knots-serve tune\` writes one there.`));
    return;
  }
  out.replaceChildren(...markdown(report.markdown), ...(report.picture ? [el("img", { src: report.picture, alt: "tuned vs default" })] : []));
};

// the report's markdown, as `knots-serve tune` writes it: headings, paragraphs and tables
function markdown(text) {
  const nodes = [];
  let table = null;
  for (const line of text.split("\n")) {
    if (line.startsWith("|")) {
      const cells = line.slice(1, -1).split("|").map((s) => s.trim());
      if (cells.every((s) => /^-+$/.test(s))) continue;
      if (!table) nodes.push((table = el("table")));
      table.append(el("tr", {}, ...cells.map((s) => el(table.rows.length ? "td" : "th", {}, s))));
      continue;
    }
    table = null;
    if (line.startsWith("# ")) nodes.push(el("h4", {}, line.slice(2)));
    else if (line.trim()) nodes.push(el("p", {}, line));
  }
  return nodes;
}

if (sessionStorage.getItem(KEY)) enter();
