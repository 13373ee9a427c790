// Trend chart drawn as inline SVG: signal windows (mean and min–max band), the fitted trend line,
// warning/failure thresholds and the forecast crossing. Written for this page; no external library.
(function () {
  'use strict';
  const NS = 'http://www.w3.org/2000/svg';
  const HOUR = 3600e3;

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text != null) node.textContent = text;
    return node;
  }

  function niceTicks(lo, hi, n) {
    const span = hi - lo || 1;
    const raw = span / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  function fmtDate(ms) {
    const d = new Date(ms);
    return d.toISOString().slice(5, 10) + ' ' + d.toISOString().slice(11, 16);
  }

  /**
   * Draw into `container`. spec = {windows: [{window_start, window_end, mean, min, max}], failure, warning,
   * trend: {at: ISO time, level, slope_per_h, ttf_h} | null, title, width, height}.
   */
  function drawTrendChart(container, spec) {
    const W = spec.width || 720, H = spec.height || 320, m = {l: 58, r: 44, t: 28, b: 40};
    const svg = el('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'class': 'trend-chart',
                           'aria-label': spec.title || 'trend chart'});
    // The line shows the value at the reference operating point (what the trend is fitted on) when the
    // trend tables have it, else the raw mean; the band is the raw min–max of each window.
    const pts = (spec.windows || []).map((w) => ({
      t: (Date.parse(w.window_start) + Date.parse(w.window_end)) / 2,
      mean: w.norm_value != null ? w.norm_value : w.mean, min: w.min, max: w.max}));
    const ys = [], ts = [];
    for (const p of pts) { ys.push(p.min, p.max, p.mean); ts.push(p.t); }
    if (spec.failure != null) ys.push(spec.failure);
    if (spec.warning != null) ys.push(spec.warning);
    let trendFrom = null, trendTo = null, crossing = null;
    const tr = spec.trend;
    if (tr && tr.level != null && tr.slope_per_h != null && tr.at) {
      const t0 = Date.parse(tr.at);
      const y = (t) => tr.level + tr.slope_per_h * (t - t0) / HOUR;
      const start = ts.length ? Math.max(ts[0], t0 - 48 * HOUR) : t0 - 48 * HOUR;
      // Where the fitted line meets the failure threshold; the reported forecast when the line never does.
      const hits = spec.failure != null && tr.slope_per_h !== 0 ? (spec.failure - tr.level) / tr.slope_per_h : NaN;
      const ahead = Number.isFinite(hits) && hits >= 0 && hits < 24 * 365 ? hits : tr.ttf_h;
      const end = ahead != null && ahead >= 0 ? t0 + ahead * HOUR : t0 + 72 * HOUR;
      trendFrom = {t: start, y: y(start)}; trendTo = {t: end, y: ahead === hits ? spec.failure : y(end)};
      if (ahead != null && spec.failure != null) crossing = {t: end, y: spec.failure};
      ys.push(trendFrom.y, trendTo.y); ts.push(start, end);
    }
    if (!ts.length) {
      container.replaceChildren(el('svg', {width: W, height: 40}));
      container.firstChild.append(el('text', {x: 10, y: 25}, 'No trend windows yet for this signal.'));
      return;
    }
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    const pad = (y1 - y0) * 0.08 || 1; y0 -= pad; y1 += pad;
    const x0 = Math.min(...ts), x1 = Math.max(...ts) + HOUR;
    const X = (t) => m.l + (t - x0) / (x1 - x0) * (W - m.l - m.r);
    const Y = (v) => H - m.b - (v - y0) / (y1 - y0) * (H - m.t - m.b);

    // axes and grid
    for (const v of niceTicks(y0, y1, 6)) {
      svg.append(el('line', {x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), stroke: '#eee'}));
      svg.append(el('text', {x: m.l - 6, y: Y(v) + 4, 'text-anchor': 'end'}, String(v)));
    }
    const nx = 6;
    for (let i = 0; i <= nx; i++) {
      const t = x0 + (x1 - x0) * i / nx;
      svg.append(el('line', {x1: X(t), x2: X(t), y1: H - m.b, y2: H - m.b + 4, stroke: '#999'}));
      svg.append(el('text', {x: X(t), y: H - m.b + 16, 'text-anchor': 'middle'}, fmtDate(t)));
    }
    svg.append(el('line', {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, stroke: '#999'}));
    svg.append(el('line', {x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, stroke: '#999'}));
    if (spec.title) svg.append(el('text', {x: m.l, y: 16, 'font-weight': 600}, spec.title));

    // min–max band and value line of the windows, broken where the tractor did not report (engine off)
    const runs = [];
    for (const p of pts) {
      const last = runs.length ? runs[runs.length - 1] : null;
      if (last && p.t - last[last.length - 1].t <= 3 * HOUR) last.push(p); else runs.push([p]);
    }
    for (const run of runs) {
      const band = run.map((p) => `${X(p.t)},${Y(p.max)}`).concat(
        run.slice().reverse().map((p) => `${X(p.t)},${Y(p.min)}`)).join(' ');
      svg.append(el('polygon', {points: band, fill: '#cfe3ff', opacity: 0.6, 'class': 'band'}));
      svg.append(el('polyline', {points: run.map((p) => `${X(p.t)},${Y(p.mean)}`).join(' '), fill: 'none',
                                 stroke: '#1f5fa8', 'stroke-width': 1.5, 'class': 'series'}));
    }
    // thresholds
    const hline = (v, colour, label, cls) => {
      if (v == null) return;
      svg.append(el('line', {x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), stroke: colour, 'stroke-dasharray': '6 4',
                             'class': cls}));
      svg.append(el('text', {x: W - m.r - 4, y: Y(v) - 4, 'text-anchor': 'end', fill: colour}, `${label} ${v}`));
    };
    hline(spec.warning, '#d08400', 'warning', 'warning-line');
    hline(spec.failure, '#b00020', 'failure', 'threshold');
    // trend and forecast crossing
    if (trendFrom) {
      svg.append(el('line', {x1: X(trendFrom.t), y1: Y(trendFrom.y), x2: X(trendTo.t), y2: Y(trendTo.y),
                             stroke: '#222', 'stroke-width': 1.5, 'stroke-dasharray': '2 3', 'class': 'trend'}));
    }
    if (crossing) {
      svg.append(el('circle', {cx: X(crossing.t), cy: Y(crossing.y), r: 5, fill: '#b00020', 'class': 'crossing'}));
      svg.append(el('text', {x: X(crossing.t) - 8, y: Y(crossing.y) + 18, 'text-anchor': 'end', fill: '#b00020'},
                    'forecast failure ' + fmtDate(crossing.t)));
    }
    container.replaceChildren(svg);
  }

  window.drawTrendChart = drawTrendChart;
})();
