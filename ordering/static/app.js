// Operator page: token login, orders with filters and actions, order detail with chart, fleet part health.
(function () {
  'use strict';
  const $ = (sel) => document.querySelector(sel);
  const NEXT = {placed: ['acknowledged', 'cancelled'], acknowledged: ['shipped', 'cancelled'],
                shipped: ['installed', 'cancelled'], installed: [], cancelled: []};
  const VERB = {acknowledged: 'Acknowledge', shipped: 'Mark shipped', installed: 'Mark installed', cancelled: 'Cancel'};
  const PAGE = 50;
  const state = {me: null, parts: [], orders: {sort: '-placed_at', offset: 0}, tractors: {offset: 0}};

  // ------------------------------------------------------------------ helpers
  function token() { return sessionStorage.getItem('fw_token'); }

  async function api(path, opts) {
    const headers = Object.assign({Authorization: 'Bearer ' + token()}, (opts && opts.headers) || {});
    const res = await fetch(path, Object.assign({}, opts || {}, {headers}));
    if (res.status === 401) { logout('Your token was refused; log in again.'); throw new Error('unauthorised'); }
    if (!res.ok) {
      let msg = res.statusText;
      try { msg = (await res.json()).detail; } catch (e) { /* not JSON */ }
      toast(String(msg)); throw new Error(msg);
    }
    return res;
  }
  const getJSON = async (path) => (await api(path)).json();

  function td(text, cls) {
    const c = document.createElement('td');
    if (text instanceof Node) c.append(text); else c.textContent = text == null ? '—' : String(text);
    if (cls) c.className = cls;
    return c;
  }
  function link(href, text) { const a = document.createElement('a'); a.href = href; a.textContent = text; return a; }
  const ttf = (h) => h == null ? '—' : (h < 48 ? h.toFixed(0) + ' h' : (h / 24).toFixed(1) + ' d');
  const when = (iso) => iso ? iso.replace('T', ' ').slice(0, 16) : '—';
  const euro = (v) => '€ ' + Math.round(v).toLocaleString('en');

  function toast(text) {
    const t = $('#toast'); t.textContent = text; t.classList.add('show');
    clearTimeout(toast.timer); toast.timer = setTimeout(() => t.classList.remove('show'), 3500);
  }

  function show(view) {
    for (const s of document.querySelectorAll('.view')) s.hidden = s.id !== 'view-' + view;
    $('#topbar').hidden = view === 'login';
    $('#nav-orders').classList.toggle('active', view.startsWith('order'));
    $('#nav-fleet').classList.toggle('active', view === 'fleet' || view === 'tractor');
  }

  function canAct() { return state.me && state.me.rights.includes('act'); }

  function actionButtons(order, after) {
    const span = document.createElement('span');
    if (!canAct()) return span;
    for (const to of NEXT[order.status] || []) {
      const b = document.createElement('button');
      b.type = 'button'; b.className = 'act'; b.dataset.to = to; b.textContent = VERB[to];
      b.addEventListener('click', () => act(order, to, after));
      span.append(b);
    }
    return span;
  }

  async function act(order, to, after) {
    const body = {to};
    if (to === 'cancelled') {
      const reason = await askCancel(order.id);
      if (!reason) return;
      Object.assign(body, reason);
    }
    await api(`/api/orders/${order.id}/transitions`, {method: 'POST', body: JSON.stringify(body),
                                                      headers: {'Content-Type': 'application/json'}});
    toast(`Order #${order.id} is now ${to}`);
    after();
  }

  function askCancel(id) {
    const dlg = $('#cancel-dialog');
    $('#cancel-id').textContent = '#' + id; $('#cancel-reason').value = '';
    return new Promise((resolve) => {
      $('#cancel-back').onclick = () => { dlg.close(); resolve(null); };
      $('#cancel-form').onsubmit = (ev) => {
        ev.preventDefault(); dlg.close();
        resolve({reason: $('#cancel-reason').value, cancel_code: $('#cancel-code').value});
      };
      dlg.showModal();
    });
  }

  // ------------------------------------------------------------------ login
  async function login(secret) {
    sessionStorage.setItem('fw_token', secret);
    const res = await fetch('/api/me', {headers: {Authorization: 'Bearer ' + secret}});
    if (!res.ok) { sessionStorage.removeItem('fw_token'); $('#login-error').textContent = 'That token is not valid.'; return false; }
    state.me = await res.json();
    $('#whoami').textContent = `${state.me.name} (${state.me.role})`;
    state.parts = await getJSON('/api/parts');
    for (const sel of [$('#f-part'), $('#t-part')]) {
      sel.replaceChildren(new Option('any', ''));
      for (const p of state.parts) sel.append(new Option(p.part_id, p.part_id));
    }
    return true;
  }

  function logout(message) {
    sessionStorage.removeItem('fw_token'); state.me = null;
    $('#login-error').textContent = message || '';
    location.hash = '#/login'; show('login');
  }

  // ------------------------------------------------------------------ orders
  function orderQuery() {
    const p = new URLSearchParams();
    const st = $('#f-status').value;
    if (st === '') ['placed', 'acknowledged', 'shipped'].forEach((s) => p.append('status', s));
    else if (st !== 'all') p.append('status', st);
    if ($('#f-priority').value) p.append('priority', $('#f-priority').value);
    if ($('#f-part').value) p.append('part_id', $('#f-part').value);
    if ($('#f-tractor').value.trim()) p.append('tractor_id', $('#f-tractor').value.trim());
    if ($('#f-from').value) p.append('placed_from', $('#f-from').value + 'T00:00:00Z');
    if ($('#f-to').value) {
      const d = new Date($('#f-to').value + 'T00:00:00Z'); d.setUTCDate(d.getUTCDate() + 1);
      p.append('placed_to', d.toISOString());
    }
    p.append('sort', state.orders.sort);
    return p;
  }

  async function loadOrders() {
    const q = orderQuery();
    q.append('limit', PAGE); q.append('offset', state.orders.offset);
    const page = await getJSON('/api/orders?' + q);
    const tbody = $('#orders-table tbody');
    tbody.replaceChildren();
    for (const o of page.items) {
      const tr = document.createElement('tr');
      tr.dataset.id = o.id;
      const status = document.createElement('span');
      status.className = 'badge st-' + o.status; status.textContent = o.status;
      const ev = o.evidence || {};
      tr.append(td(link('#/orders/' + o.id, '#' + o.id)), td(link('#/tractors/' + o.tractor_id, o.tractor_id)),
                td(o.part_id), td(status, 'status'), td(o.priority, o.priority), td(ttf(o.ttf_h)),
                td(ev.level != null ? `${ev.level.toFixed(1)} ${ev.signal || ''}` : '—'), td(when(o.placed_at)),
                td(when(o.expected_delivery)), td(euro(o.cost_eur)), td(actionButtons(o, loadOrders)));
      tbody.append(tr);
    }
    $('#orders-empty').hidden = page.items.length > 0;
    const from = page.total ? page.offset + 1 : 0;
    $('#o-range').textContent = `${from}–${page.offset + page.items.length} of ${page.total}`;
    $('#o-prev').disabled = page.offset === 0;
    $('#o-next').disabled = page.offset + page.items.length >= page.total;
    for (const th of document.querySelectorAll('#orders-table th[data-sort]')) {
      th.classList.toggle('sorted', state.orders.sort.replace('-', '') === th.dataset.sort);
    }
  }

  async function exportCsv() {
    const q = orderQuery();
    const blob = await (await api('/api/orders.csv?' + q)).blob();
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob); a.download = 'orders.csv'; a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  // ------------------------------------------------------------------ order detail
  async function loadOrder(id) {
    const o = await getJSON('/api/orders/' + id);
    $('#order-title').textContent = `Order #${o.id} — ${o.tractor_id} · ${o.part_id}`;
    const badge = $('#order-status');
    badge.textContent = o.status; badge.className = 'badge st-' + o.status;
    $('#order-actions').replaceChildren(actionButtons(o, () => loadOrder(id)));
    const ev = o.evidence || {};
    const facts = [
      ['Priority', o.priority], ['Forecast time to failure', ttf(o.ttf_h)],
      ['Earliest plausible failure', ttf(ev.ttf_earliest_h)], ['Signal', ev.signal || o.signal],
      ['Level at detection', ev.level != null ? ev.level.toFixed(2) : '—'],
      ['Trend', ev.slope_per_h != null ? `${ev.slope_per_h.toFixed(3)} per h` : '—'],
      ['Failure threshold', o.part ? o.part.failure_threshold : ev.failure_threshold],
      ['Detected (machine time)', when(ev.detected_at)], ['Alerts', o.alert_count],
      ['Lead time', ttf(o.lead_time_h)], ['Expected delivery', when(o.expected_delivery)], ['Cost', euro(o.cost_eur)],
      ['Placed', when(o.placed_at)], ['Trend windows', (ev.window_ids || []).join(', ')],
    ];
    if (o.cancel_reason) facts.push(['Cancelled because', `${o.cancel_code}: ${o.cancel_reason}`]);
    const dl = $('#order-facts'); dl.replaceChildren();
    for (const [k, v] of facts) {
      const dt = document.createElement('dt'); dt.textContent = k;
      const dd = document.createElement('dd'); dd.textContent = v == null ? '—' : String(v);
      dl.append(dt, dd);
    }
    const hb = $('#history tbody'); hb.replaceChildren();
    for (const e of o.history) {
      const tr = document.createElement('tr');
      tr.append(td(when(e.at)), td(e.kind), td(e.actor), td(`${e.from_status || '—'} → ${e.to_status || '—'}`),
                td(e.detail ? JSON.stringify(e.detail) : ''));
      hb.append(tr);
    }
    const signal = ev.signal || o.signal;
    const chart = $('#order-chart');
    if (!signal) { chart.textContent = 'No signal recorded for this order.'; return; }
    const series = await getJSON(`/api/tractors/${encodeURIComponent(o.tractor_id)}/trends/${signal}?limit=720`);
    drawTrendChart(chart, {
      windows: series.windows, failure: o.part ? o.part.failure_threshold : ev.failure_threshold,
      warning: o.part ? o.part.warning_threshold : null,
      trend: {at: ev.detected_at, level: ev.level, slope_per_h: ev.slope_per_h, ttf_h: ev.ttf_h},
      title: `${o.tractor_id} ${signal}: hourly windows, trend at detection and forecast crossing`});
  }

  // ------------------------------------------------------------------ fleet
  function healthBar(h) {
    const span = document.createElement('span'); span.className = 'bar';
    const i = document.createElement('i');
    const v = Math.max(0, Math.min(1, h));
    i.style.width = (v * 100).toFixed(0) + '%';
    i.style.background = v < 0.35 ? '#b00020' : v < 0.6 ? '#d08400' : '#2b7a3b';
    span.append(i); span.title = (v * 100).toFixed(0) + '%';
    return span;
  }

  async function loadFleet() {
    const f = await getJSON('/api/fleet');
    const open = Object.values(f.open_orders).reduce((a, b) => a + b, 0);
    $('#fleet-summary').textContent = `${f.tractors} tractors reporting · ${open} open orders ` +
      `(${Object.entries(f.open_orders).map(([k, v]) => `${v} ${k}`).join(', ')})`;
    const tb = $('#fleet-parts tbody'); tb.replaceChildren();
    for (const p of f.parts) {
      const tr = document.createElement('tr');
      const total = p.ok + p.warning + p.alert;
      tr.append(td(p.part_id), td(p.ok, 'h-ok'), td(p.warning, 'h-warning'), td(p.alert, 'h-alert'),
                td(healthBar(total ? p.ok / total : 1)));
      tb.append(tr);
    }
    await loadTractors();
  }

  async function loadTractors() {
    const p = new URLSearchParams({limit: PAGE, offset: state.tractors.offset});
    if ($('#t-status').value) p.append('status', $('#t-status').value);
    if ($('#t-part').value) p.append('part_id', $('#t-part').value);
    if ($('#t-q').value.trim()) p.append('q', $('#t-q').value.trim());
    const page = await getJSON('/api/tractors?' + p);
    const tb = $('#tractors tbody'); tb.replaceChildren();
    for (const t of page.items) {
      const tr = document.createElement('tr');
      const parts = document.createElement('span');
      parts.textContent = t.parts.slice(0, 4).map((x) => `${x.part_id} ${(x.health * 100).toFixed(0)}%`).join(' · ');
      const worst = document.createElement('span');
      worst.append(healthBar(t.worst_health), ' ' + (t.worst_health * 100).toFixed(0) + '%');
      tr.append(td(link('#/tractors/' + t.tractor_id, t.tractor_id)), td(worst), td(t.alerts, t.alerts ? 'h-alert' : ''),
                td(t.warnings, t.warnings ? 'h-warning' : ''), td(parts));
      tb.append(tr);
    }
    const from = page.total ? page.offset + 1 : 0;
    $('#t-range').textContent = `${from}–${page.offset + page.items.length} of ${page.total}`;
    $('#t-prev').disabled = page.offset === 0;
    $('#t-next').disabled = page.offset + page.items.length >= page.total;
  }

  async function loadTractor(id) {
    const t = await getJSON('/api/tractors/' + encodeURIComponent(id));
    $('#tractor-title').textContent = 'Tractor ' + t.tractor_id;
    const tb = $('#tractor-parts tbody'); tb.replaceChildren();
    const chart = $('#tractor-chart');
    const draw = async (h) => {
      const part = state.parts.find((p) => p.part_id === h.part_id) || {};
      const s = await getJSON(`/api/tractors/${encodeURIComponent(id)}/trends/${h.signal}?limit=720`);
      drawTrendChart(chart, {windows: s.windows, failure: part.failure_threshold, warning: part.warning_threshold,
        trend: {at: h.as_of, level: h.level, slope_per_h: h.slope_per_h, ttf_h: h.ttf_h},
        title: `${id} ${h.signal} (${h.part_id})`});
    };
    for (const h of t.parts) {
      const tr = document.createElement('tr');
      const name = link('#/tractors/' + id, h.part_id);
      name.addEventListener('click', (ev) => { ev.preventDefault(); draw(h); });
      tr.append(td(name), td(h.signal), td(h.level.toFixed(2)), td(healthBar(h.health)), td(h.status, 'h-' + h.status),
                td(ttf(h.ttf_h)), td(when(h.as_of)));
      tb.append(tr);
    }
    if (t.parts.length) await draw(t.parts[0]); else chart.replaceChildren();
    const ul = $('#tractor-orders'); ul.replaceChildren();
    for (const o of t.orders) {
      const li = document.createElement('li');
      li.append(link('#/orders/' + o.id, `#${o.id} ${o.part_id}`), ` ${o.status} · ${o.priority} · ${when(o.placed_at)}`);
      ul.append(li);
    }
    if (!t.orders.length) ul.textContent = 'No orders for this tractor.';
  }

  // ------------------------------------------------------------------ routing
  async function route() {
    if (!token() || !state.me) {
      if (token() && await login(token()).catch(() => false)) return route();
      show('login'); return;
    }
    const h = location.hash || '#/orders';
    let m;
    try {
      if ((m = h.match(/^#\/orders\/(\d+)$/))) { show('order'); await loadOrder(m[1]); }
      else if (h === '#/fleet') { show('fleet'); await loadFleet(); }
      else if ((m = h.match(/^#\/tractors\/([A-Za-z0-9_.:-]+)$/))) { show('tractor'); await loadTractor(m[1]); }
      else { show('orders'); await loadOrders(); }
    } catch (e) { /* already reported by api() */ }
  }

  $('#login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (await login($('#token').value.trim())) { $('#token').value = ''; location.hash = '#/orders'; route(); }
  });
  $('#logout').addEventListener('click', () => logout());
  $('#order-filters').addEventListener('submit', (ev) => { ev.preventDefault(); state.orders.offset = 0; loadOrders(); });
  $('#f-csv').addEventListener('click', exportCsv);
  $('#o-prev').addEventListener('click', () => { state.orders.offset = Math.max(0, state.orders.offset - PAGE); loadOrders(); });
  $('#o-next').addEventListener('click', () => { state.orders.offset += PAGE; loadOrders(); });
  for (const th of document.querySelectorAll('#orders-table th[data-sort]')) {
    th.addEventListener('click', () => {
      const key = th.dataset.sort === 'id' ? 'placed_at' : th.dataset.sort;
      state.orders.sort = state.orders.sort === key ? '-' + key : key;
      state.orders.offset = 0; loadOrders();
    });
  }
  $('#tractor-filters').addEventListener('submit', (ev) => { ev.preventDefault(); state.tractors.offset = 0; loadTractors(); });
  $('#t-prev').addEventListener('click', () => { state.tractors.offset = Math.max(0, state.tractors.offset - PAGE); loadTractors(); });
  $('#t-next').addEventListener('click', () => { state.tractors.offset += PAGE; loadTractors(); });
  window.addEventListener('hashchange', route);
  setInterval(() => { if (state.me && !$('#view-orders').hidden && !document.querySelector('dialog[open]')) loadOrders().catch(() => {}); }, 15000);
  route();
})();
