// llmos dashboard: reads /v1/dashboard/events (server-sent events) with the API key as a Bearer header
// and draws each snapshot. Every figure here comes from the server's snapshot; nothing is made up.
"use strict";

const HISTORY = 120; // samples kept for the scheduler timeline
const series = { running: [] };
const seenNames = {}; // pid -> the name it was shown with, so an ended process keeps its name in the timeline
const $ = (id) => document.getElementById(id);

function apiKey() {
  const params = new URLSearchParams(location.search);
  const key = params.get("key");
  if (key) { // keep it for this tab, and out of the address bar
    sessionStorage.setItem("llmos-key", key);
    params.delete("key");
    const rest = params.toString();
    window.history.replaceState(null, "", location.pathname + (rest ? "?" + rest : ""));
  }
  return sessionStorage.getItem("llmos-key");
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = "status " + (kind || "");
}

// One colour per holder: by pid where there is one (neighbouring pids get distant hues), else by name.
function hue(key) {
  let h = Number.isInteger(key) ? key : 2166136261;
  if (!Number.isInteger(key)) for (const ch of String(key)) h = Math.imul(h ^ ch.charCodeAt(0), 16777619) >>> 0;
  return (h * 137.508) % 360;
}
const colour = (key) => `hsl(${hue(key).toFixed(0)}, 65%, 45%)`;
const holderKey = (h) => (h.pid ?? h.label);

function esc(s) {
  return String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

function cells(container, count) {
  while (container.children.length < count) {
    const c = document.createElement("div");
    c.className = "cell free";
    container.appendChild(c);
  }
  while (container.children.length > count) container.lastChild.remove();
  return container.children;
}

const STATE = { f: "free", u: "used", s: "shared", c: "cached", x: "off" };

function drawKV(e) {
  const holders = e.holders;
  const map = cells($("blockmap"), e.num_blocks);
  let used = 0, shared = 0, cached = 0;
  for (let i = 0; i < e.num_blocks; i++) {
    const state = STATE[e.cells[i]];
    const h = e.owner[i] >= 0 ? holders[e.owner[i]] : null;
    const c = map[i];
    c.className = "cell " + state;
    c.dataset.state = state;
    c.style.background = state === "used" && h ? colour(holderKey(h)) : "";
    c.title = `block ${i}: ${state}` + (h ? ` — ${h.label}` : "") + (e.refs[i] > 1 ? ` (${e.refs[i]} refs)` : "");
    if (state === "used") used++;
    if (state === "shared") shared++;
    if (state === "cached") cached++;
  }
  $("kv-summary").textContent = `${e.num_blocks} blocks of ${e.block_size} tokens (capacity ${e.capacity}): ` +
    `${used} used, ${shared} shared, ${cached} cached prefix, ${e.stats.kv_blocks_free} free`;
  const host = cells($("hostmap"), e.host_blocks);
  let swapped = 0;
  for (let i = 0; i < e.host_blocks; i++) {
    const h = e.host_owner[i] >= 0 ? holders[e.host_owner[i]] : null;
    host[i].className = "cell " + (h ? "swapped" : "free");
    host[i].dataset.state = h ? "swapped" : "free";
    host[i].title = `host block ${i}` + (h ? `: ${h.label}` : ": free");
    if (h) swapped++;
  }
  $("host-summary").textContent = `${swapped} of ${e.host_blocks} host blocks hold swapped KV`;
  $("queues").innerHTML = ["running", "waiting", "swapped", "paused"].map((q) =>
    `<div class="queue" id="queue-${q}"><b>${q} (${e.queues[q].length})</b>` +
    e.queues[q].map((i) => holders[i]).map((h) =>
      `<span style="background:${colour(holderKey(h))}" title="${esc(h.tokens)} tokens, ${esc(h.blocks)} blocks">` +
      `${esc(h.label)}${h.seq ? " #" + h.seq : ""} · ${h.tokens} tok</span>`).join("") + "</div>").join("");
  const s = e.stats;
  $("engine-stats").innerHTML =
    `prompt tokens ${s.prompt_tokens}, generated ${s.generation_tokens}, finished ${s.requests_finished}, ` +
    `preemptions ${s.preemptions}, prefix-cache hit rate ${(100 * s.prefix_cache_hit_rate).toFixed(1)}%, ` +
    `KV slots holding a token ${(100 * s.kv_utilization).toFixed(1)}%`;
}

// An API agent's process is named by the agent's id: show the agent's own name beside it.
function agentName(name, contexts) {
  const c = (contexts || []).find((c) => c.agent_id === name);
  return c ? `${c.name} (${name.slice(0, 14)}…)` : name;
}

function drawProcs(procs, kernel, contexts) {
  const running = new Set(kernel ? kernel.running_pids : []);
  $("procs").tBodies[0].innerHTML = procs.map((p) => {
    const quota = p.quotas && p.quotas.llm_tokens;
    const share = quota ? Math.min(1, p.tokens_used / quota) : 0;
    const bar = quota ? `<span class="bar" style="width:${Math.round(60 * share)}px"></span>` : "";
    return `<tr data-pid="${p.pid}" data-state="${esc(p.state)}"><td>${p.pid}</td>` +
      `<td><i class="cell used" style="display:inline-block;background:${colour(p.pid)}"></i> ${esc(agentName(p.name, contexts))}</td>` +
      `<td>${esc(p.state)}${running.has(p.pid) ? " ▶" : ""}</td><td>${p.priority}</td>` +
      `<td>${bar}${p.tokens_used}${quota ? " / " + quota : ""}</td><td>${esc(p.current_syscall || "")}</td></tr>`;
  }).join("");
  if (kernel) {
    $("sched-summary").textContent = `policy ${kernel.policy}, quantum ${kernel.quantum}, ` +
      `max running ${kernel.max_running}, preemptions ${kernel.preemptions}`;
  }
}

// An engine pool (`llmos serve --replicas N`): each replica's queues, KV and routing counters.
function drawReplicas(pool) {
  $("replica-panel").hidden = false;
  $("replica-summary").textContent = `router ${pool.router}, ${pool.replicas.filter((r) => r.up).length} of ${pool.replicas.length} up`;
  $("replicas").tBodies[0].innerHTML = pool.replicas.map((r) =>
    `<tr data-replica="${r.replica}"><td>${r.replica}</td><td>${r.up ? "up" : "DOWN"}</td><td>${r.pid ?? ""}</td>` +
    `<td>${r.num_running ?? 0}</td><td>${r.num_waiting ?? 0}</td><td>${r.in_flight}</td>` +
    `<td>${r.kv_blocks_used ?? 0} / ${r.kv_blocks_total ?? 0}</td><td>${r.routed}</td><td>${r.served}</td>` +
    `<td>${r.restarts}</td><td>${r.prefix_cache_hits ?? 0} / ${r.prefix_cache_queries ?? 0}</td></tr>`).join("");
}

// The labels of a call's arguments, in short: which arguments carry untrusted data, and from where.
function labels(l) {
  if (!l || typeof l !== "object") return "";
  const tainted = Object.entries(l).filter(([, v]) => v && v.trusted === false)
    .map(([k, v]) => `${k} ← ${(v.untrusted || v.sources || []).join(", ") || "untrusted"}`);
  return tainted.length ? tainted.join("; ") : "trusted";
}

// Newest first; a run of allowed or completed calls of one agent to one tool (an operator polling the
// kernel, say) is folded into one row that counts them, so a denial is never pushed out of sight by them.
function foldAudit(rows) {
  const out = [];
  const routine = (r) => r.decision === "allow" || r.decision === "done";
  for (const r of rows.slice().reverse()) {
    const last = out[out.length - 1];
    if (last && routine(r) && routine(last.row) && last.row.agent === r.agent && last.row.tool === r.tool) {
      last.count++;
      last.first = r.id;
      last.decisions.add(r.decision);
    } else {
      out.push({ row: r, count: 1, first: r.id, decisions: new Set([r.decision]) });
    }
  }
  return out;
}

function drawAudit(audit) {
  $("audit").tBodies[0].innerHTML = foldAudit(audit.rows).map(({ row: r, count, first, decisions }) =>
    `<tr class="${esc(r.decision)}"><td>${count > 1 ? first + "–" : ""}${r.id}</td><td>${new Date(r.ts * 1000).toLocaleTimeString()}</td>` +
    `<td>${esc(r.agent)}</td><td>${esc(r.tool)}${count > 1 ? ` <small class="folded">×${count}</small>` : ""}</td>` +
    `<td class="decision-${esc(r.decision)}">${esc([...decisions].sort().join(", "))}</td>` +
    `<td class="reason">${count > 1 ? "" : esc(r.reason)}</td><td>${esc(labels(r.labels))}</td></tr>`).join("");
  const c = audit.chain;
  const chain = $("chain");
  if (!c) { chain.textContent = ""; return; }
  chain.textContent = c.ok === null ? "audit chain: " + c.status
    : `audit chain: ${c.status}${c.rows != null ? ", " + c.rows + " rows" : ""}` + (c.ok ? "" : " — " + c.message);
  chain.className = "chain " + (c.ok === false ? "bad" : c.ok ? "ok" : "");
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

// A time series from the server's ring buffer: x is time (the buffer's span), gaps where a value is null
// (no request reached its first token, or its first step, in that interval: then a dot marks none).
function line(canvas, t, values, span, fmt) {
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const known = values.filter((v) => v != null);
  const max = Math.max(1e-9, ...known);
  const x = (i) => w - 2 - ((t[t.length - 1] - t[i]) / span) * (w - 4);
  const y = (v) => h - 4 - (v / max) * (h - 16);
  g.strokeStyle = "#1976d2";
  g.fillStyle = "#1976d2";
  g.lineWidth = 2;
  g.beginPath();
  let open = false;
  values.forEach((v, i) => {
    if (v == null) { open = false; return; }
    open ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v));
    if (!open && (i + 1 >= values.length || values[i + 1] == null)) g.fillRect(x(i) - 1.5, y(v) - 1.5, 3, 3);
    open = true;
  });
  g.stroke();
  g.fillStyle = "#5b6475";
  g.font = "11px system-ui";
  g.fillText(known.length ? "max " + fmt(max) : "no samples yet", 4, 11);
  g.fillText(`last ${Math.round(span)} s`, w - 70, 11);
}

const ms = (v) => (1000 * v).toFixed(v < 0.01 ? 1 : 0) + " ms";
const lastKnown = (values) => { for (let i = values.length - 1; i >= 0; i--) if (values[i] != null) return values[i]; return null; };

function drawSeries(s) {
  const span = s.every_s * s.size; // the ring buffer's length in seconds, at the most frequent sampling
  line($("tok-chart"), s.t, s.tok_s, span, (v) => v.toFixed(1) + " tok/s");
  line($("ttft-chart"), s.t, s.ttft_s, span, ms);
  line($("queue-chart"), s.t, s.queue_s, span, ms);
  const ttft = lastKnown(s.ttft_s), queue = lastKnown(s.queue_s);
  $("tok-now").textContent = s.tok_s.length ? s.tok_s[s.tok_s.length - 1].toFixed(1) : "0";
  $("ttft-now").textContent = ttft == null ? "–" : ms(ttft);
  $("queue-now").textContent = queue == null ? "–" : ms(queue);
  $("series-summary").textContent = `${s.t.length} samples, one per ${s.every_s} s; ` +
    "TTFT and queue time: mean over the requests that got there in each interval";
}

// One agent's main context: a bar of its prompt's tokens against the window, then its memory.
const NO_CONTEXTS = '<p class="empty">no context to show yet: an API agent (POST /v1/agents) appears here once it runs</p>';

function drawContexts(rows) {
  if (!rows.length) {
    $("contexts").innerHTML = NO_CONTEXTS;
    return;
  }
  $("contexts").innerHTML = rows.map((c) => {
    const pct = (n) => (100 * n / c.window).toFixed(2) + "%";
    const bar = `<div class="occupancy" title="${c.tokens} of ${c.budget} prompt tokens (window ${c.window}, ${c.reply_tokens} kept for the reply)">` +
      `<i class="seg-fixed" style="width:${pct(c.fixed_tokens)}"></i><i class="seg-summary" style="width:${pct(c.summary_tokens)}"></i>` +
      `<i class="seg-queue" style="width:${pct(c.queue_tokens)}"></i>` +
      `<i class="seg-reply" style="left:${pct(c.budget)};width:${pct(c.reply_tokens)}"></i>` +
      `<b class="mark warn" style="left:${pct(c.warning_at)}"></b><b class="mark flush" style="left:${pct(c.flush_at)}"></b></div>`;
    const core = c.core.map((b) => `<div class="block"><b>${esc(b.label)}</b> <small>${b.chars} / ${b.limit} chars</small> ${esc(b.value)}</div>`).join("");
    return `<div class="context" data-agent="${esc(c.agent_id)}" data-queue="${c.queue}" data-tokens="${c.tokens}" data-evictions="${c.evictions}">` +
      `<div class="context-head"><b>${esc(c.name)}</b> <small>${esc(c.agent_id)}</small> ` +
      `<span class="pill ${c.pid != null ? "running" : ""}">${c.pid != null ? "running, pid " + c.pid : "idle"}</span> ` +
      `<span class="occ${c.tokens > c.budget ? " over" : ""}">${c.tokens} / ${c.budget} tokens ` +
      `(${(100 * c.tokens / c.budget).toFixed(0)}% of the prompt budget` +
      `${c.tokens > c.budget ? "; over it: the next step flushes the queue first" : ""})</span></div>` +
      bar +
      `<div class="counters"><span>queue <b class="queue-len">${c.queue}</b> messages</span>` +
      `<span>recall storage <b>${c.messages}</b> messages</span><span>archival <b>${c.passages}</b> passages</span>` +
      `<span>evictions <b class="evictions">${c.evictions}</b> in <b>${c.summaries}</b> summaries</span>` +
      `<span>recall hits <b class="recall-hits">${c.recall_hits}</b> of ${c.recall_searches} searches</span>` +
      `<span>LLM calls ${c.llm_calls}${c.overflows ? `, <b class="bad">${c.overflows} overflows</b>` : ""}</span>` +
      (c.warned ? `<span class="warned">memory-pressure warning given</span>` : "") + "</div>" +
      `<div class="core">${core}</div>` +
      `<div class="summary"><b>summary</b> ${c.summary ? esc(c.summary) : "<small>(none yet: nothing evicted)</small>"}</div></div>`;
  }).join("");
}

function drawOperator(op, admin) {
  const body = $("operator").tBodies[0];
  if (!op) {
    $("operator-summary").textContent = admin ? "not running (start it with llmos serve --operator)"
      : "its log is shown to admins only";
    body.innerHTML = "";
    return;
  }
  $("operator-summary").textContent = `pid ${op.pid}, ${op.state}: ${op.findings} findings, ${op.actions} actions ` +
    `(${op.events} events; newest first)`;
  body.innerHTML = op.log.slice().reverse().map((e) =>
    `<tr class="op-${esc(e.step)}"><td>${esc(e.step)}</td><td>${esc(e.subject)}</td><td>${esc(e.action)}</td>` +
    `<td class="reason">${esc(e.text)}</td></tr>`).join("");
}

function timeline(canvas, samples, names) {
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const pids = [...new Set(samples.flat())].sort((a, b) => a - b).slice(0, 8);
  const row = h / Math.max(1, pids.length);
  const gutter = 170; // the labels' column; the bars fill the rest
  const span = w - gutter;
  g.font = "10px system-ui";
  pids.forEach((pid, r) => {
    const label = names[pid] ? `${names[pid]} (pid ${pid})` : `pid ${pid}`;
    g.fillStyle = colour(pid);
    samples.forEach((running, i) => {
      if (running.includes(pid)) g.fillRect(gutter + (i / HISTORY) * span, r * row + 2, span / HISTORY + 0.5, row - 4);
    });
    g.fillStyle = "#1d2330";
    g.fillText(label, 2, r * row + row / 2 + 3, gutter - 6);
  });
}

function draw(snap) {
  if (snap.engine) drawKV(snap.engine);
  if (snap.replicas) drawReplicas(snap.replicas);
  if (snap.series) drawSeries(snap.series);
  if (snap.contexts) drawContexts(snap.contexts);
  if ("operator" in snap) drawOperator(snap.operator, snap.user.admin);
  if (snap.processes) {
    drawProcs(snap.processes, snap.kernel, snap.contexts);
    push(series.running, snap.kernel ? snap.kernel.running_pids : []);
    for (const p of snap.processes) seenNames[p.pid] = agentName(p.name, snap.contexts);
    timeline($("timeline"), series.running, seenNames);
  }
  if (snap.audit) drawAudit(snap.audit);
  $("model").textContent = (snap.user.admin ? "admin" : "user " + snap.user.id);
  document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
}

async function follow() {
  for (;;) {
    const key = apiKey();
    const headers = key ? { Authorization: "Bearer " + key } : {};
    try {
      const r = await fetch("/v1/dashboard/events" + location.search, { headers });
      if (r.status === 401) {
        setStatus("needs an API key", "error");
        const k = window.prompt("llmos API key (llmos serve prints where it is):");
        if (k) sessionStorage.setItem("llmos-key", k);
        else return;
        continue;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      setStatus("live", "live");
      const reader = r.body.getReader();
      const text = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += text.decode(value, { stream: true });
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (data) draw(JSON.parse(data));
        }
      }
      setStatus("reconnecting…", "");
    } catch (err) {
      setStatus("disconnected: " + err.message, "error");
    }
    await new Promise((res) => setTimeout(res, 1000));
  }
}

follow();
