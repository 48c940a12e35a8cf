/* kvstore live status page.
 *
 * Polls /cluster of every member about once a second and /metrics about every two
 * seconds, starting from the node the page was loaded from (same origin) and then
 * the members listed in its /cluster answer (nodes[].url; those answers carry
 * Access-Control-Allow-Origin: *). The page shows the cluster as the node it was loaded
 * from sees it while that node answers, and as a surviving member sees it otherwise,
 * so it follows a failover as it happens.
 *
 * Everything from the network reaches the DOM through textContent, dataset or a
 * checked href: never as markup.
 */
"use strict";

(() => {
  const CLUSTER_EVERY_MS = 1000;
  const METRICS_EVERY_MS = 2000;
  const FETCH_TIMEOUT_MS = 900;
  const HISTORY_MS = 120 * 1000;
  const MAX_EVENTS = 50;
  const LAG_CAP_ENTRIES = 10000;     // bars are log-scaled up to these
  const LAG_CAP_MS = 10000;
  const PUT_ROUTE = 'route="/kv/{key}"';
  const PUT_METHOD = 'method="PUT"';

  const S = {
    originId: null,            // the node this page was loaded from
    members: new Map(),        // id -> base URL, from the last /cluster answers
    views: new Map(),          // id -> {at, data}: the last /cluster answer of that node
    reach: new Map(),          // id -> {ok, since}: can this browser reach it
    viewId: null,              // whose /cluster the page shows
    round: 0,
    leader: undefined,         // {id, term} last shown (single-leader)
    states: new Map(),         // id -> state last shown (for the event list)
    events: [],
    scrapes: new Map(),        // id -> {t, writes, buckets: Map(le -> count)}
    nodeStats: new Map(),      // id -> {wps, elections, changes, risk, hints, at}
    electionsSeen: new Map(),  // id -> highest kv_elections_total seen (dead nodes keep theirs)
    series: [],                // {t, wps, p99ms}
    marks: [],                 // {t, label}: leader changes, for the chart
    wps: null,
    p99ms: null,
    lastViewKey: undefined,    // which node's view was shown last (for the event list)
  };

  // ---- small helpers ------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function safeUrl(u) {
    if (typeof u !== "string" || u === "") return null;
    try {
      const p = new URL(u);
      if (p.protocol !== "http:" && p.protocol !== "https:") return null;
      return p.origin;
    } catch (_) {
      return null;
    }
  }

  function clock(t) {
    const d = new Date(t);
    const p = (n) => String(n).padStart(2, "0");
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  function num(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    if (typeof v !== "number") return String(v);
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
    return Number.isInteger(v) ? String(v) : v.toFixed(1);
  }

  function ms(v) {
    if (v === null || v === undefined) return "—";
    if (v >= 1000) return (v / 1000).toFixed(2) + " s";
    if (v >= 10) return Math.round(v) + " ms";
    return v.toFixed(1) + " ms";
  }

  async function fetchText(url) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const r = await fetch(url, { cache: "no-store", signal: ctl.signal });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      return await r.text();
    } finally {
      clearTimeout(timer);
    }
  }

  // The page's own node by a same-origin path; the others by their advertised URL.
  function baseOf(id) {
    if (id === null || id === S.originId) return "";
    return S.members.get(id) || null;
  }

  function targets() {
    if (S.originId === null) return [null];
    const ids = new Set([S.originId, ...S.members.keys()]);
    return [...ids].sort();
  }

  function addEvent(kind, text, t) {
    S.events.unshift({ kind, text, t: t || Date.now() });
    if (S.events.length > MAX_EVENTS) S.events.length = MAX_EVENTS;
  }

  function setReach(id, ok, now) {
    const prev = S.reach.get(id);
    if (!prev || prev.ok !== ok) S.reach.set(id, { ok, since: now });
  }

  // ---- /cluster -----------------------------------------------------------------------
  async function pollCluster() {
    S.round += 1;
    const round = S.round;
    const now = Date.now();
    const results = await Promise.all(targets().map(async (id) => {
      const base = baseOf(id);
      if (base === null) return { id, err: "no URL" };
      try {
        return { id, data: JSON.parse(await fetchText(base + "/cluster")) };
      } catch (e) {
        return { id, err: String(e && e.message ? e.message : e) };
      }
    }));
    for (const r of results) {
      if (r.data && typeof r.data === "object" && typeof r.data.node_id === "string") {
        const id = r.data.node_id;
        if (r.id === null) S.originId = id;
        S.views.set(id, { at: now, round, data: r.data });
        setReach(id, true, now);
        for (const n of Array.isArray(r.data.nodes) ? r.data.nodes : []) {
          const u = safeUrl(n && n.url);
          if (u && typeof n.id === "string") S.members.set(n.id, u);
        }
      } else if (r.id !== null) {
        setReach(r.id, false, now);
      } else {
        setReach("(this node)", false, now);
      }
    }
    const fresh = [...S.views.values()].filter((v) => v.round === round).map((v) => v.data);
    chooseView(fresh);
    render(fresh, now);
  }

  function chooseView(fresh) {
    const ids = fresh.map((d) => d.node_id);
    if (S.originId !== null && ids.includes(S.originId)) {
      S.viewId = S.originId;
      return;
    }
    if (S.viewId !== null && ids.includes(S.viewId)) return;   // stay with a survivor
    const leader = fresh.filter((d) => d.role === "leader").sort((a, b) => b.term - a.term)[0];
    S.viewId = leader ? leader.node_id : (ids.sort()[0] || null);
  }

  // single-leader: the leader named at the highest term any reachable node is in
  function clusterLeader(fresh, view) {
    if (!view || view.mode !== "single-leader") return null;
    let maxTerm = -1;
    for (const d of fresh) maxTerm = Math.max(maxTerm, Number(d.term) || 0);
    for (const d of fresh) {
      if ((Number(d.term) || 0) === maxTerm && d.leader_id) return { id: d.leader_id, term: maxTerm };
    }
    return { id: null, term: maxTerm };
  }

  // ---- /metrics -----------------------------------------------------------------------
  function parseMetrics(text) {
    const out = { writes: 0, buckets: new Map(), risk: null, elections: null, changes: null, hints: null };
    const value = (line) => Number(line.slice(line.lastIndexOf(" ") + 1));
    for (const line of text.split("\n")) {
      if (line === "" || line[0] === "#" || line[0] === "p") continue;
      if (line.startsWith("kv_http_request_duration_seconds_bucket{")) {
        if (!line.includes(PUT_ROUTE) || !line.includes(PUT_METHOD)) continue;
        const m = /le="([^"]+)"/.exec(line);
        if (!m) continue;
        const le = m[1] === "+Inf" ? Infinity : Number(m[1]);
        out.buckets.set(le, (out.buckets.get(le) || 0) + value(line));
      } else if (line.startsWith("kv_writes_total")) {
        out.writes += value(line);
      } else if (line.startsWith("kv_writes_at_risk")) {
        out.risk = value(line);
      } else if (line.startsWith("kv_elections_total")) {
        out.elections = value(line);
      } else if (line.startsWith("kv_leader_changes_total")) {
        out.changes = value(line);
      } else if (line.startsWith("kv_hints{") || line.startsWith("kv_hints ")) {
        out.hints = value(line);
      }
    }
    return out;
  }

  // histogram_quantile over cumulative bucket counts {le -> count}
  function quantile(q, buckets) {
    const les = [...buckets.keys()].sort((a, b) => a - b);
    if (les.length === 0) return null;
    const total = buckets.get(les[les.length - 1]);
    if (!(total > 0)) return null;
    const rank = q * total;
    let prevLe = 0;
    let prevCount = 0;
    for (const le of les) {
      const c = buckets.get(le);
      if (c >= rank) {
        if (le === Infinity) return prevLe;
        if (c === prevCount) return le;
        return prevLe + (le - prevLe) * ((rank - prevCount) / (c - prevCount));
      }
      prevLe = le;
      prevCount = c;
    }
    return prevLe;
  }

  async function pollMetrics() {
    const ids = targets().filter((id) => id !== null && (!S.reach.has(id) || S.reach.get(id).ok));
    const results = await Promise.all(ids.map(async (id) => {
      try {
        return { id, m: parseMetrics(await fetchText(baseOf(id) + "/metrics")), t: performance.now() };
      } catch (_) {
        return { id, m: null };
      }
    }));
    let wps = 0;
    let rated = 0;
    const merged = new Map();
    const now = Date.now();
    for (const r of results) {
      if (!r.m) continue;
      const prev = S.scrapes.get(r.id);
      const st = { wps: null, elections: r.m.elections, changes: r.m.changes, risk: r.m.risk,
        hints: r.m.hints, at: now };
      if (prev && r.t > prev.t) {
        const dt = (r.t - prev.t) / 1000;
        let dw = r.m.writes - prev.writes;
        if (dw < 0) dw = r.m.writes;                       // the node restarted
        st.wps = dw / dt;
        wps += st.wps;
        rated += 1;
        for (const [le, c] of r.m.buckets) {
          let d = c - (prev.buckets.get(le) || 0);
          if (d < 0) d = c;
          merged.set(le, (merged.get(le) || 0) + d);
        }
      }
      S.scrapes.set(r.id, { t: r.t, writes: r.m.writes, buckets: r.m.buckets });
      S.nodeStats.set(r.id, st);
      if (r.m.elections !== null) {
        S.electionsSeen.set(r.id, Math.max(S.electionsSeen.get(r.id) || 0, r.m.elections));
      }
    }
    if (rated > 0) {
      const p99 = quantile(0.99, merged);
      S.wps = wps;
      S.p99ms = p99 === null ? null : p99 * 1000;
      S.series.push({ t: now, wps, p99ms: S.p99ms });
    } else if (results.every((r) => !r.m)) {
      S.wps = null;
      S.p99ms = null;
      S.series.push({ t: now, wps: null, p99ms: null });
    }
    while (S.series.length && S.series[0].t < now - HISTORY_MS - 5000) S.series.shift();
    while (S.marks.length && S.marks[0].t < now - HISTORY_MS - 5000) S.marks.shift();
  }

  // ---- rendering ----------------------------------------------------------------------
  function tile(i, label, value, sub, attrs) {
    const t = $(`tile-${i}`);
    t.querySelector(".label").textContent = label;
    t.querySelector(".value").textContent = value;
    t.querySelector(".sub").textContent = sub || "";
    t.dataset.none = attrs && attrs.none ? "1" : "0";
    t.dataset.warn = attrs && attrs.warn ? "1" : "0";
  }

  function render(fresh, now) {
    const viewRec = S.viewId !== null ? S.views.get(S.viewId) : null;
    const view = viewRec && viewRec.round === S.round ? viewRec.data : null;
    renderConnection(view, now);
    if (!view) {
      drawChart(now);
      renderEvents();
      return;
    }
    const mode = String(view.mode || "");
    document.body.dataset.mode = mode;
    $("cluster-name").textContent = view.cluster ? `· ${view.cluster}` : "";
    $("mode").textContent = mode;
    $("settings").textContent = settingsText(view);
    const leader = clusterLeader(fresh, view);
    trackChanges(view, leader, now);
    renderSummary(view, leader, fresh);
    renderNodes(view, leader, now);
    renderEvents();
    drawChart(now);
    if (mode === "single-leader") {
      document.title = leader && leader.id ? `${leader.id} leads (term ${leader.term}) · kvstore`
        : "no leader · kvstore";
    } else {
      document.title = `${mode} · kvstore`;
    }
    document.body.dataset.ready = "1";
  }

  function settingsText(v) {
    if (v.mode === "leaderless") {
      const parts = [`N=${v.n} W=${v.w} R=${v.r}`];
      if (v.conflict) parts.push(`conflict: ${v.conflict}`);
      if (v.sloppy_quorum) parts.push("sloppy quorum");
      return parts.join(" · ");
    }
    const parts = [];
    if (v.acks) parts.push(`acks: ${v.acks}`);
    if (v.mode === "multi-leader" && v.conflict) parts.push(`conflict: ${v.conflict}`);
    return parts.join(" · ");
  }

  function renderConnection(view, now) {
    const conn = $("conn");
    const banner = $("banner");
    const originOk = S.originId !== null && S.reach.get(S.originId) && S.reach.get(S.originId).ok;
    conn.dataset.view = S.viewId || "";
    if (originOk && view) {
      conn.dataset.ok = "yes";
      $("conn-text").textContent = `live · ${S.originId} (this page's node), updated ${clock(now)}`;
      banner.hidden = true;
      return;
    }
    const who = S.originId || "this page's node";
    const since = S.originId !== null && S.reach.get(S.originId) ? S.reach.get(S.originId).since
      : (S.reach.get("(this node)") || { since: now }).since;
    banner.hidden = false;
    $("banner-title").textContent = `${who} is not answering (since ${clock(since)})`;
    if (view) {
      conn.dataset.ok = "fallback";
      $("conn-text").textContent = `${who} down · showing ${S.viewId}'s view, updated ${clock(now)}`;
      $("banner-text").textContent = `The node this page was loaded from does not answer; still retrying it every second. ` +
        `Showing the cluster as ${S.viewId} sees it. Open another member's page:`;
    } else {
      conn.dataset.ok = "no";
      $("conn-text").textContent = `no node answers · retrying (${clock(now)})`;
      const tried = targets().filter((x) => x !== null);
      $("banner-text").textContent = tried.length
        ? `No member answers this browser; retrying ${tried.join(", ")} every second.`
        : "Retrying every second.";
    }
    const links = $("banner-links");
    links.replaceChildren();
    for (const [id, url] of [...S.members.entries()].sort()) {
      if (id === S.originId) continue;
      const a = el("a", null, `${id} · ${url}`);
      a.setAttribute("href", url + "/ui");
      links.appendChild(a);
    }
  }

  function trackChanges(view, leader, now) {
    if (S.events.length === 0 && S.lastViewKey === undefined) {
      const n = Array.isArray(view.nodes) ? view.nodes.length : 0;
      addEvent("info", `watching ${view.cluster ? "cluster " + view.cluster + ": " : ""}${n} nodes, ${view.mode}`, now);
    }
    if (leader) {
      const prev = S.leader;
      if (prev === undefined || prev.id !== leader.id || prev.term !== leader.term) {
        if (leader.id) {
          const was = prev && prev.id && prev.id !== leader.id ? ` (was ${prev.id})` : "";
          addEvent("leader", `term ${leader.term}: ${leader.id} leads${was}`, now);
          if (prev !== undefined) S.marks.push({ t: now, label: leader.id });
        } else if (prev === undefined || prev.id) {
          addEvent("down", `term ${leader.term}: no leader — election under way`, now);
        }
        S.leader = leader;
      }
    }
    for (const n of Array.isArray(view.nodes) ? view.nodes : []) {
      const prev = S.states.get(n.id);
      if (prev !== undefined && prev !== n.state) {
        const kind = n.state === "up" ? "up" : "down";
        addEvent(kind, `${n.id}: ${prev} → ${n.state} (as ${view.node_id} sees it)`, now);
      }
      S.states.set(n.id, n.state);
    }
    const originOk = S.originId !== null && S.reach.get(S.originId) && S.reach.get(S.originId).ok;
    const key = originOk ? "origin" : `view:${S.viewId}`;
    if (S.lastViewKey !== undefined && S.lastViewKey !== key) {
      addEvent(originOk ? "up" : "down", originOk ? `${S.originId} answers again`
        : `${S.originId} stopped answering; now polling ${S.viewId}`, now);
    }
    S.lastViewKey = key;
  }

  function leaderView(leader) {
    if (!leader || !leader.id) return null;
    const rec = S.views.get(leader.id);
    return rec && rec.round === S.round ? rec.data : null;
  }

  function renderSummary(view, leader, fresh) {
    const nodes = Array.isArray(view.nodes) ? view.nodes : [];
    const up = nodes.filter((n) => n.state === "up").length;
    const wps = S.wps === null ? "—" : num(Math.round(S.wps * 10) / 10);
    const p99 = ms(S.p99ms);
    $("events-title").textContent = view.mode === "single-leader" ? "Leader history" : "Events";
    if (view.mode === "single-leader") {
      const lv = leaderView(leader);
      tile(0, "Leader", leader && leader.id ? `★ ${leader.id}` : "none",
        leader && leader.id ? `term ${leader.term} · ${view.node_id === leader.id ? "this view" : "seen by " + view.node_id}`
          : "election under way", { none: !(leader && leader.id) });
      tile(1, "Writes / s", wps, "all nodes");
      tile(2, "p99 write", p99, "last 2 s");
      let risk = null;
      let riskSub = "on the leader only: a failover could remove them";
      if (leader && leader.id && S.nodeStats.has(leader.id) && S.nodeStats.get(leader.id).risk !== null) {
        risk = S.nodeStats.get(leader.id).risk;
      } else if (lv && typeof lv.last_index === "number" && typeof lv.safe === "number") {
        risk = Math.max(0, lv.last_index - lv.safe);
      } else {
        riskSub = "leader not reachable from here";
      }
      tile(3, "Writes at risk", num(risk), riskSub, { warn: risk > 0 });
      let elections = 0;
      for (const v of S.electionsSeen.values()) elections += v;
      let changes = null;
      for (const st of S.nodeStats.values()) if (st.changes !== null) changes = Math.max(changes || 0, st.changes);
      tile(4, "Elections", num(elections), `started, all nodes · ${num(changes)} leader changes`);
      tile(5, "Nodes up", `${up} / ${nodes.length}`, `as ${view.node_id} sees them`, { warn: up < nodes.length });
    } else if (view.mode === "multi-leader") {
      tile(0, "Writers", `all ${nodes.length}`, "every node takes writes");
      tile(1, "Writes / s", wps, "all nodes");
      tile(2, "p99 write", p99, "last 2 s");
      const c = view.conflicts && typeof view.conflicts === "object" ? view.conflicts : {};
      const lww = Number(c.lww_discarded) || 0;
      const sib = Number(c.siblings) || 0;
      tile(3, "Conflicts", num(lww + sib), `lww discarded ${num(lww)} · siblings ${num(sib)}`, { warn: lww + sib > 0 });
      let maxLag = 0;
      for (const n of nodes) if (typeof n.lag_entries === "number") maxLag = Math.max(maxLag, n.lag_entries);
      tile(4, "Max lag", `${num(maxLag)}`, `entries of ${view.node_id}'s writes`, { warn: maxLag > 0 });
      tile(5, "Nodes up", `${up} / ${nodes.length}`, `as ${view.node_id} sees them`, { warn: up < nodes.length });
    } else {
      tile(0, "Quorum", `N${view.n} W${view.w} R${view.r}`, "no leader: any node coordinates");
      tile(1, "Writes / s", wps, "all nodes");
      tile(2, "p99 write", p99, "last 2 s");
      let hints = 0;
      for (const d of fresh) hints += Number(d.hints) || 0;
      tile(3, "Hints pending", num(hints), "writes held for a missing replica", { warn: hints > 0 });
      tile(4, "Keys", num(view.keys), `held by ${view.node_id}`);
      tile(5, "Nodes up", `${up} / ${nodes.length}`, `as ${view.node_id} sees them`, { warn: up < nodes.length });
    }
  }

  function level(v, warn, bad) {
    return v >= bad ? "2" : v >= warn ? "1" : "0";
  }

  function bar(label, value, cap, text, warn, bad) {
    const row = el("div", "bar-row");
    row.appendChild(el("span", "k", label));
    const track = el("div", "track");
    const fill = el("div", "fill");
    const v = typeof value === "number" && value > 0 ? value : 0;
    const pct = v > 0 ? Math.max(3, Math.min(100, (Math.log10(1 + v) / Math.log10(1 + cap)) * 100)) : 0;
    fill.style.width = `${pct.toFixed(1)}%`;
    fill.dataset.level = level(v, warn, bad);
    track.appendChild(fill);
    row.appendChild(track);
    row.appendChild(el("span", "n", text));
    return row;
  }

  function fact(k, v) {
    const f = el("div", "fact");
    f.appendChild(el("div", "k", k));
    f.appendChild(el("div", "v", v));
    return f;
  }

  function renderNodes(view, leader, now) {
    const mode = view.mode;
    const box = $("nodes");
    const lv = mode === "single-leader" ? leaderView(leader) : null;
    const lagSource = lv || view;
    const lagRows = new Map((Array.isArray(lagSource.nodes) ? lagSource.nodes : []).map((n) => [n.id, n]));
    const hintsFor = new Map();
    if (mode === "leaderless") {
      for (const rec of S.views.values()) {
        if (rec.round !== S.round) continue;
        for (const n of rec.data.nodes || []) {
          if (n.id !== rec.data.node_id) hintsFor.set(n.id, (hintsFor.get(n.id) || 0) + (Number(n.hints) || 0));
        }
      }
    }
    const hintText = {
      "single-leader": `lag as ${lagSource.node_id} (${lv ? "the leader" : "not the leader"}) sees it`,
      "multi-leader": `lag: ${view.node_id}'s writes a node still lacks`,
      "leaderless": "hints: writes other nodes hold for it",
    };
    $("nodes-hint").textContent = hintText[mode] || "";
    const cards = [];
    const rows = (Array.isArray(view.nodes) ? view.nodes : []).slice().sort((a, b) => String(a.id).localeCompare(String(b.id)));
    for (const n of rows) {
      const own = S.views.get(n.id);
      const ownFresh = own && own.round === S.round ? own.data : null;
      const reach = S.reach.get(n.id);
      const isLeader = mode === "single-leader" ? !!(leader && leader.id === n.id) : n.role === "leader";
      let role = String(n.role);
      if (mode === "single-leader" && !isLeader) {
        role = String(ownFresh ? ownFresh.role : n.role);
        if (role === "leader") role = "stale-leader";   // claims a term the cluster has left
      }
      const state = typeof n.state === "string" ? n.state : "unknown";
      const card = el("article", "node");
      card.dataset.node = n.id;
      card.dataset.role = String(role);
      card.dataset.state = state;
      card.dataset.mode = mode;

      const head = el("div", "node-head");
      if (mode === "single-leader" && isLeader) head.appendChild(el("span", "crown", "★"));
      head.appendChild(el("span", "node-id", n.id));
      head.appendChild(el("span", `role role-${role}`, role.replace("-", " ")));
      head.appendChild(el("span", `state state-${["up", "suspect", "down"].includes(state) ? state : "unknown"}`, state));
      card.appendChild(head);

      const tags = el("div", "tags");
      if (n.id === S.originId) tags.appendChild(el("span", "tag tag-here", "this page's node"));
      if (n.id === S.viewId && S.viewId !== S.originId) tags.appendChild(el("span", "tag tag-here", "view shown"));
      if (reach && !reach.ok) tags.appendChild(el("span", "tag tag-warn", `no answer to this browser since ${clock(reach.since)}`));
      if (tags.childElementCount) card.appendChild(tags);

      const url = safeUrl(n.url);
      if (url) {
        const u = el("div", "node-url");
        const a = el("a", null, url);
        a.setAttribute("href", url + "/ui");
        u.appendChild(a);
        card.appendChild(u);
      }

      const facts = el("div", "facts");
      const src = ownFresh || (n.id === view.node_id ? view : null);
      if (mode === "single-leader") {
        facts.appendChild(fact("term", src ? num(src.term) : "—"));
        facts.appendChild(fact("applied", src ? num(src.applied) : "—"));
        facts.appendChild(fact("follows", src ? (src.leader_id || "none") : "—"));
      } else if (mode === "leaderless") {
        facts.appendChild(fact("applied", src ? num(src.applied) : "—"));
        facts.appendChild(fact("keys", src ? num(src.keys) : "—"));
        facts.appendChild(fact("hints held", src ? num(src.hints) : "—"));
      } else {
        const cf = src && src.conflicts && typeof src.conflicts === "object" ? src.conflicts : null;
        facts.appendChild(fact("applied", src ? num(src.applied) : "—"));
        facts.appendChild(fact("keys", src ? num(src.keys) : "—"));
        facts.appendChild(fact("conflicts", cf ? num((Number(cf.lww_discarded) || 0) + (Number(cf.siblings) || 0)) : "—"));
      }
      card.appendChild(facts);

      const bars = el("div", "bars");
      if (mode === "single-leader" && isLeader) {
        const l = lv || (src && src.role === "leader" ? src : null);
        card.appendChild(el("div", "note", l
          ? `leads · commit ${num(l.commit)} · last ${num(l.last_index)} · acks ${l.acks || "?"}`
          : "leads (its own view is not reachable from here)"));
      } else if (mode === "leaderless") {
        const h = hintsFor.get(n.id) || 0;
        bars.appendChild(bar("hints", h, LAG_CAP_ENTRIES, `${num(h)}`, 1, 1000));
      } else if (mode === "multi-leader" && n.id === view.node_id) {
        card.appendChild(el("div", "note", "the view shown: lag of the others is measured against its writes"));
      } else {
        const lr = lagRows.get(n.id) || n;
        const le = typeof lr.lag_entries === "number" ? lr.lag_entries : null;
        const lm = typeof lr.lag_ms === "number" ? lr.lag_ms : null;
        if (le === null && lm === null) {
          card.appendChild(el("div", "note", "lag unknown from here"));
        } else {
          bars.appendChild(bar("entries", le, LAG_CAP_ENTRIES, le === null ? "—" : num(le), 10, 1000));
          bars.appendChild(bar("behind", lm, LAG_CAP_MS, ms(lm), 200, 2000));
        }
      }
      if (bars.childElementCount) card.appendChild(bars);

      const st = S.nodeStats.get(n.id);
      if (st && now - st.at < 3 * METRICS_EVERY_MS && !(reach && !reach.ok)) {
        const parts = [`${st.wps === null ? "—" : num(Math.round(st.wps * 10) / 10)} writes/s taken`];
        if (mode === "single-leader") {
          parts.push(`${num(st.elections)} elections`, `${num(st.changes)} leader changes`);
          if (isLeader && st.risk !== null) parts.push(`${num(st.risk)} at risk`);
        }
        card.appendChild(el("div", "mini", parts.join(" · ")));
      }
      cards.push(card);
    }
    box.replaceChildren(...cards);
  }

  function renderEvents() {
    const list = $("events");
    if (S.events.length === 0) {
      list.replaceChildren(el("li", "empty", "nothing yet"));
      return;
    }
    list.replaceChildren(...S.events.map((e) => {
      const li = el("li", `ev-${e.kind}`);
      li.appendChild(el("span", "t", clock(e.t)));
      li.appendChild(el("span", "m", e.text));
      return li;
    }));
  }

  // ---- chart (canvas, drawn by hand) --------------------------------------------------
  // the top of an axis with four gridlines at round steps (1, 2, 2.5 or 5 times a power of ten)
  function niceMax(v, floor) {
    const step = Math.max(v, floor) / 4;
    const p = Math.pow(10, Math.floor(Math.log10(step)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= step) return 4 * m * p;
    return 40 * p;
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
  }

  function drawChart(now) {
    const c = $("chart");
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth;
    const h = c.clientHeight;
    if (w === 0 || h === 0) return;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const L = 44, R = 52, T = 10, B = 22;
    const pw = w - L - R, ph = h - T - B;
    if (pw <= 10 || ph <= 10) return;
    // the window grows with the page's age, from 30 s up to HISTORY_MS
    const first = S.series.length ? S.series[0].t : now;
    const span = Math.min(HISTORY_MS, Math.max(30000, Math.ceil((now - first + 2000) / 10000) * 10000));
    const t0 = now - span;
    const x = (t) => L + ((t - t0) / span) * pw;
    const pts = S.series.filter((p) => p.t >= t0 - METRICS_EVERY_MS);
    c.dataset.samples = String(pts.length);
    const wMax = niceMax(Math.max(0, ...pts.map((p) => p.wps || 0)), 10);
    const pMax = niceMax(Math.max(0, ...pts.map((p) => p.p99ms || 0)), 10);
    const yW = (v) => T + ph - (v / wMax) * ph;
    const yP = (v) => T + ph - (Math.min(v, pMax) / pMax) * ph;
    const ink = cssVar("--muted"), line = cssVar("--line"), accent = cssVar("--accent");
    const p99c = cssVar("--p99"), lead = cssVar("--lead");
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    // grid and axes
    for (let i = 0; i <= 4; i += 1) {
      const y = Math.round(T + (ph * i) / 4) + 0.5;
      ctx.strokeStyle = line;
      ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(L + pw, y); ctx.stroke();
      ctx.fillStyle = accent;
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      ctx.fillText(num(wMax * (1 - i / 4)), L - 6, y);
      ctx.fillStyle = p99c;
      ctx.textAlign = "left";
      ctx.fillText(ms(pMax * (1 - i / 4)).replace(" ", ""), L + pw + 6, y);
    }
    ctx.fillStyle = ink;
    ctx.textBaseline = "top";
    const spanS = Math.round(span / 1000);
    const most = pw < 360 ? 2 : 4;
    const step = [5, 10, 15, 20, 30, 60].find((v) => spanS / v <= most) || 60;
    for (let s = 0; s <= spanS; s += step) {
      const xx = x(now - s * 1000);
      ctx.textAlign = s === 0 ? "right" : s + step > spanS ? "left" : "center";
      ctx.fillText(s === 0 ? "now" : `−${s}s`, xx, T + ph + 6);
    }
    ctx.save();
    ctx.beginPath(); ctx.rect(L, T - 2, pw, ph + 4); ctx.clip();
    // writes/s: filled area, broken where no node answered
    const segments = [];
    let cur = [];
    for (const p of pts) {
      if (p.wps === null) { if (cur.length) segments.push(cur); cur = []; } else cur.push(p);
    }
    if (cur.length) segments.push(cur);
    for (const seg of segments) {
      ctx.beginPath();
      ctx.moveTo(x(seg[0].t), yW(0));
      for (const p of seg) ctx.lineTo(x(p.t), yW(p.wps));
      ctx.lineTo(x(seg[seg.length - 1].t), yW(0));
      ctx.closePath();
      ctx.globalAlpha = 0.22; ctx.fillStyle = accent; ctx.fill();
      ctx.globalAlpha = 1;
      ctx.beginPath();
      seg.forEach((p, i) => (i ? ctx.lineTo(x(p.t), yW(p.wps)) : ctx.moveTo(x(p.t), yW(p.wps))));
      ctx.strokeStyle = accent; ctx.lineWidth = 1.5; ctx.stroke();
    }
    // p99: a line, broken where there were no writes
    ctx.strokeStyle = p99c; ctx.lineWidth = 2;
    ctx.beginPath();
    let open = false;
    for (const p of pts) {
      if (p.p99ms === null) { open = false; continue; }
      if (open) ctx.lineTo(x(p.t), yP(p.p99ms)); else { ctx.moveTo(x(p.t), yP(p.p99ms)); open = true; }
    }
    ctx.stroke();
    for (const p of pts) {
      if (p.p99ms !== null) { ctx.fillStyle = p99c; ctx.fillRect(x(p.t) - 1.5, yP(p.p99ms) - 1.5, 3, 3); }
    }
    // leader changes
    ctx.setLineDash([4, 3]);
    ctx.strokeStyle = lead; ctx.fillStyle = lead; ctx.lineWidth = 1.5;
    ctx.textAlign = "left"; ctx.textBaseline = "top";
    ctx.font = "bold 11px system-ui, sans-serif";
    for (const m of S.marks) {
      if (m.t < t0) continue;
      const xx = Math.round(x(m.t)) + 0.5;
      ctx.beginPath(); ctx.moveTo(xx, T); ctx.lineTo(xx, T + ph); ctx.stroke();
      ctx.fillText(`★ ${m.label}`, Math.min(xx + 4, L + pw - 40), T + 2);
    }
    ctx.restore();
    if (pts.length < 2) {
      ctx.fillStyle = ink; ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.font = "12px system-ui, sans-serif";
      ctx.fillText("collecting samples…", L + pw / 2, T + ph / 2);
    }
  }

  // ---- loops --------------------------------------------------------------------------
  function every(fn, period) {
    const run = async () => {
      const t = performance.now();
      try {
        await fn();
      } catch (e) {
        console.error("kvstore status page:", e);   // a bug: say so, keep polling
      }
      setTimeout(run, Math.max(50, period - (performance.now() - t)));
    };
    run();
  }

  window.addEventListener("resize", () => drawChart(Date.now()));
  renderEvents();
  every(pollCluster, CLUSTER_EVERY_MS);
  setTimeout(() => every(pollMetrics, METRICS_EVERY_MS), 300);
})();
