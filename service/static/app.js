// IPT playground: plain JavaScript against the service's own API (no framework, no CDN).
"use strict";

const $ = (sel) => document.querySelector(sel);
const KIND_COLORS = { classification: "#2f6fdf", multiple_choice: "#d68910", generation: "#1e8a4c" };
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const state = { taskId: null, stream: null, points: [], total: 0 };

// ---------------------------------------------------------------------------------------------- the API
function headers(json) {
  const h = {};
  const key = $("#api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  const text = await response.text();
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { detail: text }; }
  if (!response.ok) throw { status: response.status, detail: data && data.detail !== undefined ? data.detail : data };
  return data;
}

function message(err) {
  if (err && err.status === 401) return "The service wants an API key (type it at the top).";
  if (err && typeof err.detail === "string") return err.detail;
  if (err && Array.isArray(err.detail)) return err.detail.map((d) => d.msg).join("; ");
  return "The service could not be reached: " + (err && err.message ? err.message : String(err));
}

// ------------------------------------------------------------------------------- parsing pasted examples
function splitLine(line, sep) {
  const out = []; let cur = ""; let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quoted) {
      if (c === '"' && line[i + 1] === '"') { cur += '"'; i++; }
      else if (c === '"') quoted = false;
      else cur += c;
    } else if (c === '"' && cur === "") quoted = true;
    else if (c === sep) { out.push(cur); cur = ""; }
    else cur += c;
  }
  out.push(cur);
  return out;
}

function parseExamples(text) {
  const lines = text.split(/\r?\n/).filter((l) => l.trim() !== "");
  const rows = []; const errors = [];
  if (!lines.length) return { rows, errors };
  if (lines[0].trim().startsWith("{")) {
    lines.forEach((line, i) => {
      try {
        const o = JSON.parse(line);
        if (typeof o.input !== "string" || typeof o.output !== "string") throw new Error("needs string input and output");
        rows.push(o.options ? { input: o.input, output: o.output, options: o.options } : { input: o.input, output: o.output });
      } catch (e) { errors.push(`line ${i + 1}: ${e.message}`); }
    });
    return { rows, errors };
  }
  const sep = lines[0].includes("\t") ? "\t" : ",";
  let start = 0;
  const head = splitLine(lines[0], sep).map((c) => c.trim().toLowerCase());
  if (head[0] === "input" && head[1] === "output") start = 1;
  for (let i = start; i < lines.length; i++) {
    const cells = splitLine(lines[i], sep);
    if (cells.length < 2) { errors.push(`line ${i + 1}: needs an input and an output separated by ${sep === "\t" ? "a tab" : "a comma"}`); continue; }
    const output = cells.pop().trim(); const input = cells.join(sep).trim();
    if (!input || !output) { errors.push(`line ${i + 1}: empty input or output`); continue; }
    rows.push({ input, output });
  }
  return { rows, errors };
}

function guessKind(rows) {
  if (rows.some((r) => r.options)) return "multiple_choice";
  const labels = new Set(rows.map((r) => r.output));
  return labels.size <= Math.max(2, Math.min(20, rows.length / 2)) ? "classification" : "generation";
}

function refreshParse() {
  const { rows, errors } = parseExamples($("#examples").value);
  localStorage.setItem("ipt.draft", $("#examples").value);
  const kindSel = $("#task-kind").value;
  const kind = kindSel || (rows.length ? guessKind(rows) : "");
  if (!$("#task-labels").dataset.edited) {
    $("#task-labels").value = kind === "classification" ? [...new Set(rows.map((r) => r.output))].sort().join(", ") : "";
  }
  $("#parse-summary").textContent = rows.length ? `${rows.length} examples read; kind: ${kind}${kindSel ? "" : " (inferred)"}` : "";
  setError("train", errors.join("\n"));
  return { rows, errors, kind };
}

// ---------------------------------------------------------------------------------------- field errors
function setError(field, text) {
  const el = document.querySelector(`.field-error[data-field="${field}"]`);
  if (el) el.textContent = text || "";
}

function showCreateErrors(err) {
  document.querySelectorAll("#create-form .field-error").forEach((e) => { e.textContent = ""; });
  if (!err) return;
  if (Array.isArray(err.detail)) {
    for (const d of err.detail) {
      const loc = (d.loc || []).filter((x) => x !== "body");
      const field = ["name", "labels", "kind", "train"].includes(loc[0]) ? loc[0] : "_form";
      const where = loc.length > 1 ? ` (${loc.slice(1).join(" > ")})` : "";
      const el = document.querySelector(`.field-error[data-field="${field}"]`);
      el.textContent = (el.textContent ? el.textContent + "\n" : "") + d.msg + where;
    }
  } else setError("_form", message(err));
}

// ------------------------------------------------------------------------------------------- tasks
async function createTask(event) {
  event.preventDefault();
  const { rows, errors, kind } = refreshParse();
  if (errors.length) return;
  const body = { name: $("#task-name").value.trim(), train: rows };
  if ($("#task-kind").value) body.kind = $("#task-kind").value;
  const labels = $("#task-labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (labels.length && (body.kind || kind) === "classification") body.labels = labels;
  $("#create-button").disabled = true;
  try {
    const task = await api("POST", "/tasks", body);
    showCreateErrors(null);
    if (task.warning) setError("_form", task.warning);
    await loadTasks();
    openTask(task.id);
  } catch (err) { showCreateErrors(err); }
  finally { $("#create-button").disabled = false; }
}

async function loadTasks() {
  try {
    const data = await api("GET", "/tasks?limit=100");
    const body = $("#task-table tbody"); body.innerHTML = "";
    for (const t of data.tasks) {
      const tr = document.createElement("tr"); tr.className = "task-row"; tr.dataset.id = t.id;
      const cells = [t.name, t.kind, t.status, t.dev_score === null || t.dev_score === undefined ? "" : t.dev_score.toFixed(2)];
      cells.forEach((c, i) => { const td = document.createElement("td"); td.textContent = c; if (i === 2) td.className = "st-" + c; tr.appendChild(td); });
      const td = document.createElement("td"); const del = document.createElement("button");
      del.className = "small danger"; del.textContent = "delete"; del.dataset.action = "delete";
      td.appendChild(del); tr.appendChild(td);
      tr.addEventListener("click", (e) => { if (e.target.dataset.action === "delete") deleteTask(t.id); else openTask(t.id); });
      body.appendChild(tr);
    }
    $("#service-status").textContent = `${data.total} task(s)`;
    loadMap();
  } catch (err) { $("#service-status").textContent = message(err); }
}

async function deleteTask(id) {
  try { await api("DELETE", `/tasks/${id}`); } catch (err) { $("#service-status").textContent = message(err); }
  if (state.taskId === id) closeTask();
  loadTasks();
}

function closeTask() {
  if (state.stream) state.stream.abort();
  state.taskId = null; $("#task-panel").classList.add("hidden");
}

async function openTask(id) {
  closeTask();
  state.taskId = id; state.points = []; state.total = 0;
  $("#task-panel").classList.remove("hidden");
  $("#try-box").classList.add("hidden"); $("#answer").textContent = ""; $("#bars").innerHTML = "";
  try {
    const t = await api("GET", `/tasks/${id}`);
    $("#task-title").textContent = `${t.name} (${t.kind})`;
    state.total = (t.progress && t.progress.total) || 0;
    renderStatus(t.status, t);
  } catch (err) { $("#task-status").textContent = message(err); return; }
  followEvents(id, "0");
}

function renderStatus(status, t) {
  let text = status;
  if (t && t.dev_score !== null && t.dev_score !== undefined) text += ` - dev score ${t.dev_score.toFixed(3)}`;
  if (t && t.bare_dev_score !== null && t.bare_dev_score !== undefined) text += ` (bare model ${t.bare_dev_score.toFixed(3)})`;
  if (t && t.note) text += ` - ${t.note}`;
  if (t && t.error) text += ` - ${t.error.message || t.error.code}`;
  $("#task-status").textContent = text;
  $("#task-status").className = "status-line st-" + status;
  $("#cancel-button").disabled = FINAL.has(status);
  if (status === "succeeded") { $("#try-box").classList.remove("hidden"); $("#task-progress").value = 1; loadSimilar(); }
}

// ------------------------------------------------------------------- the events stream (SSE over fetch)
async function followEvents(id, lastId) {
  const controller = new AbortController(); state.stream = controller;
  try {
    const h = headers(false); h["Accept"] = "text/event-stream"; if (lastId !== "0") h["Last-Event-ID"] = lastId;
    const response = await fetch(`/tasks/${id}/events`, { headers: h, signal: controller.signal });
    if (!response.ok) throw { status: response.status, detail: (await response.json()).detail };
    const reader = response.body.getReader(); const decoder = new TextDecoder(); let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        const msg = {};
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const i = line.indexOf(": "); if (i > 0) msg[line.slice(0, i)] = line.slice(i + 2);
        }
        if (msg.id) lastId = msg.id;
        if (msg.event) onEvent(id, msg.event, msg.data ? JSON.parse(msg.data) : {});
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;
    $("#task-status").textContent = "connection lost; reconnecting ... " + message(err);
  }
  if (state.taskId === id && !controller.signal.aborted && !FINAL.has(state.lastType)) {
    setTimeout(() => { if (state.taskId === id) followEvents(id, lastId); }, 2000);  // resume where it stopped
  }
}

function onEvent(id, type, data) {
  if (state.taskId !== id) return;
  state.lastType = type;
  if (type === "started" && data.total_steps) state.total = data.total_steps;
  if (type === "evaluation") {
    state.points.push(data);
    if (state.total) $("#task-progress").value = Math.min(1, data.step / state.total);
    drawCurve();
    $("#task-status").textContent = `running - step ${data.step}${state.total ? " of " + state.total : ""}, dev score ${data.dev === undefined ? "-" : Number(data.dev).toFixed(3)}`;
  }
  if (FINAL.has(type) || type === "deleted") {
    api("GET", `/tasks/${id}`).then((t) => renderStatus(t.status, t)).catch(() => closeTask());
    loadTasks();
  } else if (type === "queued" || type === "started") $("#task-status").textContent = type;
}

function drawCurve() {
  const svg = $("#curve"); svg.innerHTML = "";
  const pts = state.points; if (!pts.length) return;
  const maxStep = Math.max(1, ...pts.map((p) => p.step));
  const losses = pts.map((p) => p.dev_loss).filter((v) => v !== undefined && v !== null);
  const maxLoss = losses.length ? Math.max(...losses) : 1;
  const line = (key, scale, color) => {
    const coords = pts.filter((p) => p[key] !== undefined && p[key] !== null)
      .map((p) => `${10 + 300 * p.step / maxStep},${110 - 100 * p[key] / scale}`);
    if (!coords.length) return;
    const poly = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    poly.setAttribute("points", coords.join(" ")); poly.setAttribute("fill", "none");
    poly.setAttribute("stroke", color); poly.setAttribute("stroke-width", "2");
    svg.appendChild(poly);
  };
  line("dev", 1, "#2f6fdf");
  line("dev_loss", maxLoss || 1, "#d68910");
}

// --------------------------------------------------------------------------------- predict, similar, map
async function predict(event) {
  event.preventDefault();
  const text = $("#predict-input").value.trim(); if (!text) return;
  setError("predict", "");
  try {
    const data = await api("POST", `/tasks/${state.taskId}/predict`, { inputs: [text] });
    const p = data.predictions[0];
    $("#answer").textContent = p.output;
    const bars = $("#bars"); bars.innerHTML = "";
    if (p.probabilities) {
      for (const [option, prob] of Object.entries(p.probabilities).sort((a, b) => b[1] - a[1])) {
        const row = document.createElement("div"); row.className = "bar" + (option === p.output ? " best" : "");
        row.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span></span><span class="pct"></span>';
        row.querySelector(".label").textContent = option;
        row.querySelector(".fill").style.width = `${(100 * prob).toFixed(1)}%`; row.querySelector(".fill").style.display = "block";
        row.querySelector(".pct").textContent = `${(100 * prob).toFixed(1)}%`;
        bars.appendChild(row);
      }
    }
  } catch (err) { setError("predict", message(err)); }
}

async function loadSimilar() {
  const list = $("#similar"); list.innerHTML = "";
  try {
    const data = await api("GET", `/tasks/${state.taskId}/similar?k=5`);
    for (const s of data.similar) { const li = document.createElement("li"); li.textContent = `${s.name} (cosine ${s.cosine.toFixed(2)})`; list.appendChild(li); }
    if (!data.similar.length) list.innerHTML = "<li>no other trained task yet</li>";
  } catch (err) { list.textContent = message(err); }
}

async function loadMap() {
  const svg = $("#task-map"); svg.innerHTML = "";
  try {
    const data = await api("GET", "/map");
    const pts = data.tasks;
    $("#map-note").textContent = pts.length ? `first two principal components of the task vectors` +
      (data.explained_variance.length ? ` (${data.explained_variance.map((v) => (100 * v).toFixed(0) + "%").join(" + ")} of their variance)` : "") +
      "; colour: kind" : "trained tasks appear here";
    const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
    const span = (v) => (Math.max(...v) - Math.min(...v)) || 1;
    for (const p of pts) {
      const c = document.createElementNS("http://www.w3.org/2000/svg", "circle");
      c.setAttribute("cx", 20 + 280 * (p.x - Math.min(...xs)) / span(xs));
      c.setAttribute("cy", 180 - 160 * (p.y - Math.min(...ys)) / span(ys));
      c.setAttribute("r", 6); c.setAttribute("fill", KIND_COLORS[p.kind] || "#888");
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title"); title.textContent = p.name;
      c.appendChild(title); c.addEventListener("click", () => openTask(p.id)); svg.appendChild(c);
    }
  } catch (err) { $("#map-note").textContent = message(err); }
}

// ------------------------------------------------------------------------------------------- wiring
function init() {
  $("#api-key").value = localStorage.getItem("ipt.key") || "";
  $("#examples").value = localStorage.getItem("ipt.draft") || "";
  $("#api-key").addEventListener("change", () => { localStorage.setItem("ipt.key", $("#api-key").value.trim()); loadTasks(); });
  $("#examples").addEventListener("input", refreshParse);
  $("#task-kind").addEventListener("change", refreshParse);
  $("#task-labels").addEventListener("input", () => { $("#task-labels").dataset.edited = "1"; });
  $("#create-form").addEventListener("submit", createTask);
  $("#predict-form").addEventListener("submit", predict);
  $("#refresh").addEventListener("click", loadTasks);
  $("#cancel-button").addEventListener("click", async () => {
    try { await api("POST", `/tasks/${state.taskId}/cancel`); } catch (err) { $("#task-status").textContent = message(err); }
  });
  $("#delete-button").addEventListener("click", () => deleteTask(state.taskId));
  refreshParse();
  loadTasks();
}

document.addEventListener("DOMContentLoaded", init);
