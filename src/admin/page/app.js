/* tallyd admin page: the metric explorer (/) and the status page (/status).
 *
 * One script for both views, chosen by location.pathname, served as
 * /assets/app.js under `default-src 'self'`: no inline code or style, no
 * eval, no third-party code. Nodes are built with createElement and texts
 * are text nodes only: metric names and tag values come from the network.
 * Charts are SVG drawn here. API: /api/status, /api/metrics, /api/series,
 * /api/events (JSON; a 401 asks for the admin token).
 */
'use strict';

const TOKEN_KEY = 'tallyd-token';
const TYPES = ['counter', 'gauge', 'timer', 'set'];
const $ = (id) => document.getElementById(id);

/* ---------- DOM ---------- */

function build(node, attrs, kids) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid !== null && kid !== undefined && kid !== false) node.append(kid instanceof Node ? kid : String(kid));
  }
  return node;
}

/** An HTML element; strings among `kids` become text nodes. */
const el = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
/** An SVG element. */
const svg = (tag, attrs, ...kids) => build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, kids);

function setState(state) {
  document.body.dataset.state = state;
}

function showError(message) {
  $('error').textContent = message || '';
  $('error').hidden = !message;
}

/* ---------- Formatting ---------- */

const nf = (o) => new Intl.NumberFormat(undefined, o);
const NF0 = nf({ maximumFractionDigits: 0 });
const NF1 = nf({ maximumFractionDigits: 1 });
const NF3 = nf({ maximumFractionDigits: 3 });
const NFS = nf({ maximumSignificantDigits: 4 });
const df = (o) => new Intl.DateTimeFormat(undefined, o);
const DATE_TIME = df({ dateStyle: 'medium', timeStyle: 'medium' });
const HMS = df({ hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
const HM = df({ hour: '2-digit', minute: '2-digit', hourCycle: 'h23' });
const DAY = df({ month: 'short', day: 'numeric' });

const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

/** A number for a table: thousands separators, a few decimals. */
function fmtNum(v) {
  if (!isNum(v)) return v === null || v === undefined ? '—' : String(v);
  const a = Math.abs(v);
  return (a !== 0 && a < 1 ? NFS : a >= 1e5 ? NF0 : NF3).format(v);
}

const fmtRate = (v) => (isNum(v) ? `${fmtNum(v)}/s` : '—');

function fmtBytes(n) {
  if (!isNum(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  for (; Math.abs(n) >= 1024 && i < units.length - 1; i += 1) n /= 1024;
  return `${(i ? NF1 : NF0).format(n)} ${units[i]}`;
}

function fmtDuration(s) {
  if (!isNum(s)) return '—';
  s = Math.max(0, s);
  if (s < 10) return `${NF1.format(s)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

/** An axis label: 1.5k, 20M, 0.25, 300µ. */
function fmtSI(v) {
  const a = Math.abs(v);
  const clean = (x) => String(+x.toPrecision(4));
  if (a === 0) return '0';
  if (a < 0.001) return a >= 1e-6 ? `${clean(v * 1e6)}µ` : v.toExponential(1);
  let i = 0;
  while (a / 1000 ** i >= 1000 && i < 6) i += 1;
  return clean(v / 1000 ** i) + ['', 'k', 'M', 'G', 'T', 'P', 'E'][i];
}

const isoTime = (ts) => new Date(ts * 1000).toISOString().replace('.000Z', 'Z');
const fmtDateTime = (ts) => (isNum(ts) ? DATE_TIME.format(new Date(ts * 1000)) : '—');

/* ---------- API ---------- */

let memoryToken = '';
let tokenPrompt = null;

function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || memoryToken;
  } catch {
    return memoryToken;
  }
}

/** Shows the token form; resolves once a token is stored (one prompt for all callers). */
function askToken(message) {
  tokenPrompt = tokenPrompt || new Promise((resolve) => {
    const form = $('token-form');
    $('token-message').textContent = message;
    form.hidden = false;
    $('token').value = '';
    $('token').focus();
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      memoryToken = $('token').value.trim();
      try {
        sessionStorage.setItem(TOKEN_KEY, memoryToken);
      } catch { /* storage off: kept for this page only */ }
      form.hidden = true;
      tokenPrompt = null;
      resolve();
    }, { once: true });
  });
  return tokenPrompt;
}

/** GETs `path?params` as JSON; throws an Error with the API's message. */
async function api(path, params) {
  const url = params && String(params) ? `${path}?${params}` : path;
  for (;;) {
    const headers = { Accept: 'application/json' };
    if (token()) headers.Authorization = `Bearer ${token()}`;
    let resp;
    try {
      resp = await fetch(url, { headers, cache: 'no-store' });
    } catch (e) {
      throw new Error(`tallyd did not answer (${e.message})`);
    }
    const body = await resp.json().catch(() => null);
    const message = body && typeof body.error === 'string' ? body.error : '';
    if (resp.status !== 401) {
      if (!resp.ok || !body || message) throw new Error(message || `${path}: HTTP ${resp.status} ${resp.statusText}`);
      return body;
    }
    showError(message || 'The admin API needs a token.');
    setState('error');
    await askToken('Enter the admin token to continue.');
    showError('');
  }
}

/* ---------- Charts ---------- */

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200,
  10800, 21600, 43200, 86400, 172800, 604800, 1209600, 2592000];
const r1 = (v) => Math.round(v * 10) / 10;

/** Round ticks (1, 2, 5 × 10^k) covering [lo, hi]. */
function niceTicks(lo, hi, n) {
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  const step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; ticks.length < 60; v += step) {
    ticks.push(+v.toPrecision(12));
    if (v >= hi - step * 1e-9) break;
  }
  return ticks;
}

/** The y range and ticks of the given point columns. */
function yScale(series, cols, fromZero, n) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const s of series) {
    for (const p of s.points) {
      for (const c of cols) {
        if (isNum(p[c])) [lo, hi] = [Math.min(lo, p[c]), Math.max(hi, p[c])];
      }
    }
  }
  if (lo > hi) [lo, hi] = [0, 1];
  if (fromZero) [lo, hi] = [Math.min(lo, 0), Math.max(hi, 0)];
  if (lo === hi) {
    const d = Math.abs(lo) * 0.1 || 1;
    [lo, hi] = [fromZero && lo === 0 ? 0 : lo - d, hi + d];
  }
  const ticks = niceTicks(lo, hi, n);
  return { lo: ticks[0], hi: ticks[ticks.length - 1], ticks };
}

/** Time ticks aligned to local time, about one per 110 px. */
function timeTicks(from, to, width) {
  const want = Math.max(2, Math.floor(width / 110));
  const span = to - from;
  const step = TIME_STEPS.find((s) => span / s <= want) || 2592000 * Math.ceil(span / want / 2592000);
  const off = -new Date(from * 1000).getTimezoneOffset() * 60;
  const ticks = [];
  for (let t = Math.ceil((from + off) / step) * step - off; t <= to; t += step) {
    const d = new Date(t * 1000);
    const midnight = d.getHours() + d.getMinutes() + d.getSeconds() === 0;
    ticks.push({ ts: t, label: (step >= 86400 || midnight ? DAY : step < 60 ? HMS : HM).format(d) });
  }
  return ticks;
}

/** An SVG path through column `c` of the points, with a gap at each null;
 * a point alone between gaps is drawn as a small ring, so that it shows. */
function linePath(points, c, px, py) {
  let d = '';
  let run = [];
  const close = () => {
    if (run.length === 1) {
      const [x, y] = run[0];
      d += `M${r1(x - 2.5)} ${y}a2.5 2.5 0 1 0 5 0a2.5 2.5 0 1 0 -5 0`;
    } else if (run.length) {
      d += `M${run.map(([x, y]) => `${x} ${y}`).join('L')}`;
    }
    run = [];
  };
  for (const p of points) {
    if (isNum(p[c])) run.push([r1(px(p[0])), r1(py(p[c]))]);
    else close();
  }
  close();
  return d;
}

/** A filled band between columns `lo` and `hi` (a gauge's min and max). */
function bandPath(points, lo, hi, px, py) {
  let d = '';
  let run = [];
  const close = () => {
    const at = (c) => (p) => `${r1(px(p[0]))} ${r1(py(p[c]))}`;
    if (run.length) d += `M${run.map(at(hi)).join('L')}L${run.reverse().map(at(lo)).join('L')}Z`;
    run = [];
  };
  for (const p of points) {
    if (isNum(p[lo]) && isNum(p[hi])) run.push(p);
    else close();
  }
  close();
  return d;
}

/** The point of `points` (sorted by time) nearest to `ts`. */
function nearest(points, ts) {
  let [a, b] = [0, points.length - 1];
  if (b < 0) return null;
  while (a < b) {
    const m = (a + b) >> 1;
    if (points[m][0] < ts) a = m + 1;
    else b = m;
  }
  if (a > 0 && Math.abs(points[a - 1][0] - ts) <= Math.abs(points[a][0] - ts)) a -= 1;
  return points[a];
}

const colorClass = (label, i) => (label === 'other' ? 'c-other' : `c${i % 10}`);

const swatch = (cls) => svg('svg', { class: 'swatch', width: 24, height: 10, 'aria-hidden': 'true' },
  svg('line', { class: `line ${cls}`, x1: 2, x2: 22, y1: 5, y2: 5 }));

/** One chart of `spec.columns` of /api/series' answer `data`, with event markers. */
function drawChart(spec, data, events, width) {
  const W = Math.max(320, Math.round(width));
  const H = spec.small ? 140 : 280;
  const M = { l: 56, r: 16, t: 12, b: 26 };
  const { from } = data;
  const to = Math.max(data.to, from + 1);
  const cols = spec.columns.map((c) => data.columns.indexOf(c) + 1);
  const band = spec.band && spec.band.map((c) => data.columns.indexOf(c) + 1);
  const y = yScale(data.series, cols.concat(band || []), spec.fromZero, spec.small ? 3 : 5);
  const px = (ts) => M.l + ((ts - from) / (to - from)) * (W - M.l - M.r);
  const py = (v) => H - M.b - ((v - y.lo) / (y.hi - y.lo)) * (H - M.t - M.b);
  const root = svg('svg', {
    class: 'chart', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img',
    'aria-label': `${data.name}: ${spec.title}`, 'data-series-count': data.series.length,
  });
  const grid = svg('g', { class: 'grid' });
  for (const t of y.ticks) {
    const yy = r1(py(t));
    grid.append(svg('line', { x1: M.l, x2: W - M.r, y1: yy, y2: yy }),
      svg('text', { class: 'ytick', x: M.l - 6, y: yy + 4 }, fmtSI(t)));
  }
  for (const t of timeTicks(from, to, W)) {
    const xx = r1(px(t.ts));
    grid.append(svg('line', { x1: xx, x2: xx, y1: M.t, y2: H - M.b }),
      svg('text', { class: 'xtick', x: xx, y: H - 8 }, t.label));
  }
  grid.append(svg('line', { class: 'axis', x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }));
  root.append(grid);
  data.series.forEach((s, i) => {
    const cc = colorClass(s.label, i);
    if (band) root.append(svg('path', { class: `band ${cc}`, 'data-band': s.label, d: bandPath(s.points, band[0], band[1], px, py) }));
    cols.forEach((c, j) => root.append(svg('path', {
      class: `line ${cc} d${j}`, 'data-series': s.label, 'data-column': spec.columns[j], d: linePath(s.points, c, px, py),
    })));
  });
  if (!data.series.some((s) => s.points.length)) {
    root.append(svg('text', { class: 'nodata', x: W / 2, y: H / 2 }, 'no data in this range'));
  }
  for (const e of events) {
    if (!isNum(e.ts) || e.ts < from || e.ts > to) continue;
    const xx = r1(px(e.ts));
    root.append(svg('line', { class: 'event', x1: xx, x2: xx, y1: M.t, y2: H - M.b, 'data-ts': e.ts },
      svg('title', null, e.title || 'event')));
  }
  const area = el('div', { class: 'plot-area' }, root);
  addHover(area, root, spec, data, { W, H, M, from, to, px, cols });
  const key = spec.columns.length > 1
    && el('ul', { class: 'legend' }, spec.columns.map((c, j) => el('li', null, swatch(`c-key d${j}`), c)));
  return el('figure', { class: 'plot' }, el('figcaption', null, spec.title, key), area);
}

/** A guide line and a tooltip with the values nearest the pointer. */
function addHover(area, root, spec, data, g) {
  const guide = svg('line', { class: 'guide', y1: g.M.t, y2: g.H - g.M.b, visibility: 'hidden' });
  const tip = el('div', { class: 'tip', hidden: true });
  root.append(guide);
  area.append(tip);
  const hide = () => {
    guide.setAttribute('visibility', 'hidden');
    tip.hidden = true;
  };
  root.addEventListener('pointerleave', hide);
  root.addEventListener('pointermove', (ev) => {
    const box = root.getBoundingClientRect();
    const x = ((ev.clientX - box.left) * g.W) / box.width;
    const ts = g.from + ((x - g.M.l) / (g.W - g.M.l - g.M.r)) * (g.to - g.from);
    const near = data.series.map((s) => nearest(s.points, ts)).filter(Boolean);
    if (x < g.M.l || x > g.W - g.M.r || !near.length) return hide();
    const best = near.reduce((b, p) => (Math.abs(p[0] - ts) < Math.abs(b - ts) ? p[0] : b), near[0][0]);
    const gx = r1(g.px(best));
    guide.setAttribute('x1', gx);
    guide.setAttribute('x2', gx);
    guide.setAttribute('visibility', 'visible');
    const rows = data.series.map((s, i) => {
      const p = nearest(s.points, best);
      if (!p || p[0] !== best) return null;
      const values = g.cols.map((c, j) => `${g.cols.length > 1 ? `${spec.columns[j]} ` : ''}${fmtNum(p[c])}`);
      return el('div', null, swatch(colorClass(s.label, i)), el('span', { class: 'tip-label' }, s.label), ' ', values.join('  '));
    });
    tip.replaceChildren(el('div', { class: 'muted' }, fmtDateTime(best)), ...rows.filter(Boolean));
    tip.hidden = false;
    const left = (gx * box.width) / g.W;
    const flip = left > box.width / 2;
    tip.style.left = flip ? '' : `${left + 12}px`;
    tip.style.right = flip ? `${box.width - left + 12}px` : '';
  });
}

/* ---------- Explorer ---------- */

/** The charts of each type; the data table has every column. */
const CHARTS = {
  counter: [{ title: 'rate (per second)', columns: ['rate'], fromZero: true }],
  gauge: [{ title: 'last (band: min to max)', columns: ['last'], band: ['min', 'max'] }],
  timer: [
    { title: 'p50, p90, p99, max', columns: ['p50', 'p90', 'p99', 'max'], fromZero: true },
    { title: 'count', columns: ['count'], fromZero: true, small: true },
  ],
  set: [{ title: 'uniques', columns: ['uniques'], fromZero: true }],
};

const explorer = { params: null, last: null, runSeq: 0, liveGen: 0, flushSecs: 0, found: [], searchSeq: 0 };

function chartSpecs(data) {
  const has = (c) => data.columns.includes(c);
  const specs = (CHARTS[data.type] || [])
    .map((s) => ({ ...s, columns: s.columns.filter(has), band: s.band && s.band.every(has) && s.band }))
    .filter((s) => s.columns.length);
  if (!specs.length && data.columns.length) specs.push({ title: data.columns[0], columns: [data.columns[0]] });
  return specs;
}

function localInput(ts) {
  const d = new Date(ts * 1000);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

const inputUnix = (value) => Math.floor(new Date(value).getTime() / 1000);

function showCustom() {
  const custom = $('range').value === 'custom';
  for (const f of document.querySelectorAll('.field.custom')) f.hidden = !custom;
  $('from').required = custom;
  $('to').required = custom;
  if (custom && !$('from').value) {
    const now = Date.now() / 1000;
    $('from').value = localInput(now - 3600);
    $('to').value = localInput(now);
  }
}

/** Fills the form from the URL's query string. */
function formFromUrl(p) {
  for (const k of ['name', 'host', 'group']) $(k).value = p.get(k) || '';
  if (TYPES.includes(p.get('type'))) $('type').value = p.get('type');
  $('tags').value = p.getAll('tag').join(', ');
  $('top').value = p.get('top') || '5';
  const range = $('range');
  if (!p.get('range') && p.get('from') && p.get('to')) {
    range.value = 'custom';
    $('from').value = localInput(Number(p.get('from')));
    $('to').value = localInput(Number(p.get('to')));
  } else {
    const r = p.get('range') || '1h';
    if (![...range.options].some((o) => o.value === r)) range.insertBefore(el('option', { value: r }, r), range.lastElementChild);
    range.value = r;
  }
  $('live').checked = p.get('live') === '1';
  showCustom();
}

/** The form as the URL's (and the API's) parameters. */
function paramsFromForm() {
  const p = new URLSearchParams({ name: $('name').value.trim(), type: $('type').value });
  // Commas separate tags, as on the wire: a tag value may hold spaces.
  for (const t of $('tags').value.split(',')) if (t.trim()) p.append('tag', t.trim());
  if ($('host').value.trim()) p.set('host', $('host').value.trim());
  if ($('group').value.trim()) {
    p.set('group', $('group').value.trim());
    p.set('top', $('top').value || '5');
  }
  if ($('range').value === 'custom') {
    const [from, to] = [inputUnix($('from').value), inputUnix($('to').value)];
    if (!(from < to)) throw new Error('The start of the range must be before its end.');
    p.set('from', from);
    p.set('to', to);
  } else {
    p.set('range', $('range').value);
  }
  if ($('live').checked) p.set('live', '1');
  return p;
}

/** Runs the query of `params` (else the form's); `quiet` keeps the page as it is while loading. */
async function run({ quiet = false, params = null } = {}) {
  let p;
  try {
    p = params || paramsFromForm();
  } catch (e) {
    showError(e.message);
    return setState('error');
  }
  if (!p.get('name')) return undefined;
  explorer.params = p;
  history.replaceState(null, '', `${location.pathname}?${p}`);
  $('permalink').href = location.href;
  const seq = ++explorer.runSeq;
  if (!quiet) setState('loading');
  const q = new URLSearchParams(p);
  q.delete('live');
  const ev = new URLSearchParams({ limit: '100' });
  for (const k of ['range', 'from', 'to']) if (p.has(k)) ev.set(k, p.get(k));
  try {
    const [data, events] = await Promise.all([
      api('/api/series', q),
      api('/api/events', ev).catch((e) => ({ events: [], failed: e.message })),
    ]);
    if (seq !== explorer.runSeq) return undefined;
    explorer.last = { data, events: Array.isArray(events.events) ? events.events : [], eventsMore: Boolean(events.more) };
    renderResult(data, explorer.last.events);
    showError(events.failed && `Events: ${events.failed}`);
    return setState('ready');
  } catch (e) {
    if (seq !== explorer.runSeq) return undefined;
    showError(e.message);
    return setState('error');
  }
}

function renderResult(data, events) {
  data.columns = data.columns || [];
  data.series = data.series || [];
  const res = $('resolution');
  res.dataset.resolution = data.resolution;
  res.textContent = `${data.resolution_text || data.resolution}, ${fmtNum(data.step)} s per point`;
  $('sql').textContent = (data.sql || []).join(';\n\n');
  renderCharts(data, events);
  renderEvents(events, explorer.last && explorer.last.eventsMore);
  renderTable(data);
}

function renderCharts(data, events) {
  const width = $('chart').clientWidth || 800;
  $('chart').replaceChildren(...chartSpecs(data).map((spec) => drawChart(spec, data, events, width)),
    el('ul', { class: 'legend series-legend', 'aria-label': 'Series' },
      data.series.map((s, i) => el('li', null, swatch(colorClass(s.label, i)), s.label))));
}

function renderEvents(events, more) {
  const alerts = ['info', 'success', 'warning', 'error'];
  $('events').replaceChildren(...events.map((e) => el('li', {
    'data-ts': e.ts, 'data-alert': alerts.includes(e.alert_type) && e.alert_type,
  }, el('time', { datetime: isNum(e.ts) && isoTime(e.ts) }, fmtDateTime(e.ts)), ' ',
  el('strong', null, e.title || ''),
  e.text && el('span', { class: 'event-text' }, e.text),
  el('span', { class: 'muted' }, [e.host, ...(e.tags || [])].filter(Boolean).join(' ')))));
  $('events-empty').hidden = events.length > 0;
  $('events-more').hidden = !more;
}

/** The data table: one row per point of every series (tests read this DOM). */
function renderTable(data) {
  const body = document.createElement('tbody');
  for (const s of data.series) {
    for (const p of s.points) {
      body.append(el('tr', { 'data-series': s.label, 'data-ts': p[0] },
        el('td', { class: 'label' }, s.label), el('td', { class: 'time' }, isoTime(p[0])),
        data.columns.map((c, i) => {
          const v = p[i + 1] === undefined ? null : p[i + 1];
          return el('td', { class: 'num', 'data-column': c, 'data-value': v === null ? '' : String(v) }, v === null ? '' : fmtNum(v));
        })));
    }
  }
  $('data').replaceChildren(el('thead', null, el('tr', null, el('th', { scope: 'col' }, 'series'),
    el('th', { scope: 'col' }, 'time'), data.columns.map((c) => el('th', { scope: 'col', class: 'num' }, c)))), body);
  $('data-count').textContent = `(${fmtNum(body.rows.length)} rows, ${data.series.length} series)`;
}

/** Starts or stops re-running the query every flush_interval (read once from /api/status). */
async function syncLive() {
  const gen = ++explorer.liveGen;
  if (!$('live').checked) return;
  if (!explorer.flushSecs) {
    const st = await api('/api/status').catch(() => ({}));
    explorer.flushSecs = Math.max(1, Number(st.flush_interval) || 1);
  }
  const tick = async () => {
    if (gen !== explorer.liveGen) return;
    await run({ quiet: true, params: explorer.params });
    if (gen === explorer.liveGen) setTimeout(tick, every() * 1000);
  };
  // A chart of minutes or hours changes no faster than its step: poll at
  // that pace, not every flush (each poll is a ClickHouse statement).
  const every = () => Math.max(explorer.flushSecs, Number(explorer.last && explorer.last.data.step) || 0);
  if (gen === explorer.liveGen && explorer.params) setTimeout(tick, every() * 1000);
}

async function searchMetrics() {
  const seq = ++explorer.searchSeq;
  let answer;
  try {
    answer = await api('/api/metrics', new URLSearchParams({ q: $('name').value.trim(), limit: '20' }));
  } catch (e) {
    return seq === explorer.searchSeq && showError(e.message);
  }
  if (seq !== explorer.searchSeq || document.activeElement !== $('name')) return undefined;
  const found = answer.metrics || [];
  explorer.found = found;
  const more = (answer.total || 0) - found.length;
  // replaceChildren would print a false as text: only nodes go in.
  $('metric-list').replaceChildren(...[...found.map((m, i) => el('li', null,
    el('button', { type: 'button', class: 'pick', 'data-index': i },
      el('span', { class: 'm-name' }, m.name), el('span', { class: 'm-type' }, m.type),
      el('span', { class: 'm-keys' }, `${fmtNum(m.keys)} keys`),
      el('span', { class: 'm-tags' }, (m.tag_keys || []).join(' '))))),
  !found.length && el('li', { class: 'muted' }, 'No metric seen in the last minute matches; type a whole name to chart it.'),
  more > 0 && el('li', { class: 'muted' }, `${fmtNum(more)} more…`)].filter(Boolean));
  $('metric-list').hidden = false;
  return undefined;
}

function pickMetric(m) {
  $('name').value = m.name;
  if (TYPES.includes(m.type)) $('type').value = m.type;
  $('group-keys').replaceChildren(...['host', ...(m.tag_keys || [])].map((k) => el('option', { value: k })));
  $('metric-list').hidden = true;
}

/** A URL without a type: take the metric's own, when tallyd has it in memory. */
async function guessType(name) {
  const answer = await api('/api/metrics', new URLSearchParams({ q: name, limit: '200' })).catch(() => ({}));
  const m = (answer.metrics || []).find((x) => x.name === name);
  if (m) pickMetric(m);
}

async function copySql() {
  try {
    await navigator.clipboard.writeText($('sql').textContent);
    $('copy-note').textContent = 'Copied.';
  } catch {
    getSelection().selectAllChildren($('sql'));
    $('copy-note').textContent = 'Selected: press Ctrl+C.';
  }
  setTimeout(() => { $('copy-note').textContent = ''; }, 3000);
}

function bindExplorer() {
  let searchTimer = 0;
  let resizeTimer = 0;
  const name = $('name');
  const list = $('metric-list');
  const field = name.parentElement;
  const searchSoon = () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(searchMetrics, 250);
  };
  name.addEventListener('input', searchSoon);
  name.addEventListener('focus', searchSoon);
  name.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') list.hidden = true;
    if (e.key === 'ArrowDown' && !list.hidden && list.querySelector('button')) {
      e.preventDefault();
      list.querySelector('button').focus();
    }
  });
  field.addEventListener('focusout', (e) => {
    if (!field.contains(e.relatedTarget)) list.hidden = true;
  });
  list.addEventListener('mousedown', (e) => e.preventDefault());
  list.addEventListener('click', (e) => {
    const b = e.target.closest('button.pick');
    if (b) {
      pickMetric(explorer.found[Number(b.dataset.index)]);
      name.focus();
    }
  });
  $('range').addEventListener('change', showCustom);
  $('query').addEventListener('submit', (e) => {
    e.preventDefault();
    list.hidden = true;
    run().then(syncLive);
  });
  $('live').addEventListener('change', () => (name.value.trim() ? run({ quiet: true }) : Promise.resolve()).then(syncLive));
  $('copy-sql').addEventListener('click', copySql);
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => explorer.last && renderCharts(explorer.last.data, explorer.last.events), 200);
  });
}

async function initExplorer() {
  bindExplorer();
  const p = new URLSearchParams(location.search);
  formFromUrl(p);
  $('permalink').href = location.href;
  if (!p.get('name')) return setState('ready');
  if (!TYPES.includes(p.get('type'))) await guessType(p.get('name'));
  await run();
  return syncLive();
}

/* ---------- Status ---------- */

/** The samples of one /api/status answer: get(name, labels) and all(name). */
function samples(st) {
  const list = (st.metrics || []).filter((m) => m && typeof m.name === 'string');
  const key = (name, l) => `${name}${JSON.stringify(Object.entries(l || {}).sort())}`;
  const map = new Map(list.map((m) => [key(m.name, m.labels), m.value]));
  return {
    list, time: st.time,
    get: (name, labels) => map.get(key(name, labels)),
    all: (name) => list.filter((m) => m.name === name).map((m) => ({ ...m, labels: m.labels || {} })),
  };
}

/** Per second since the previous poll (null on the first poll, or after a reset). */
function rate(cur, prev, name, labels) {
  const [a, b] = [prev && prev.get(name, labels), cur.get(name, labels)];
  const dt = prev ? cur.time - prev.time : 0;
  return isNum(a) && isNum(b) && dt > 0 && b >= a ? (b - a) / dt : null;
}

const round3 = (v) => (isNum(v) ? Math.round(v * 1000) / 1000 : null);

/** A numeric cell: data-column, data-value (empty when unknown) and its text. */
const numTd = (column, value, text) => el('td', { class: 'num', 'data-column': column, 'data-value': isNum(value) ? String(value) : '' },
  text === undefined ? fmtNum(value) : text);

/** A rate cell (data-value rounded to 0.001). */
const rateTd = (column, v) => numTd(column, round3(v), fmtRate(v));

/** A row headed by `head`; `nonzero` highlights it. */
const row = (attrs, nonzero, head, ...cells) => el('tr', { ...attrs, class: nonzero ? 'nonzero' : null },
  el('th', { scope: 'row' }, head), cells);

function table(id, heads, rows, empty) {
  if (!rows.length && empty) return el('p', { id, class: 'muted' }, empty);
  const numeric = (i) => rows[0] && rows[0].cells[i] && rows[0].cells[i].classList.contains('num');
  return el('table', { id, class: 'data' },
    el('thead', null, el('tr', null, heads.map((h, i) => el('th', { scope: 'col', class: numeric(i) && 'num' }, h)))),
    el('tbody', null, rows));
}

const facts = (id, items) => el('dl', { id, class: 'facts' },
  items.filter(Boolean).map(([label, text, attrs]) => [el('dt', null, label), el('dd', attrs, text)]));

const card = (id, title, ...kids) => el('section', { id, class: 'card' }, el('h2', null, title), kids);

function healthSection(st) {
  const h = st.health || { status: 'unknown' };
  const problems = Array.isArray(h.problems) ? h.problems : [];
  const ok = h.status === 'ok';
  return el('section', { id: 'health', class: `card health ${ok ? 'ok' : 'bad'}`, 'data-status': h.status },
    el('h2', null, 'Health: ', h.status),
    problems.length > 0 && el('ul', { class: 'problems' }, problems.map((p) => el('li', null, p))),
    !ok && !problems.length && el('p', null, 'tallyd is starting or stopping.'));
}

/** ClickHouse down: shown right after health, with how long and why (rows wait in the spool). */
function clickhouseDown(st) {
  const c = st.clickhouse || {};
  if (c.up !== false) return null;
  return el('section', { id: 'clickhouse-down', class: 'card health bad', 'data-failing-seconds': c.failing_seconds },
    el('h2', null, `ClickHouse: failing for ${fmtNum(c.failing_seconds)} s`),
    el('p', null, 'Every statement failed since then; closed intervals wait in the spool and are sent once it answers.'),
    c.last_error && el('p', { class: 'event-text' }, `Last error: ${c.last_error}`));
}

function listenersSection(cur, prev) {
  const rows = cur.all('tallyd_received_lines_total').map((m) => {
    const bytes = rate(cur, prev, 'tallyd_received_bytes_total', m.labels);
    return row({ 'data-listener': m.labels.listener }, false, m.labels.listener,
      rateTd('lines_per_second', rate(cur, prev, m.name, m.labels)),
      numTd('bytes_per_second', round3(bytes), isNum(bytes) ? `${fmtBytes(bytes)}/s` : '—'),
      numTd('lines_total', m.value));
  });
  const samplesRate = rate(cur, prev, 'tallyd_samples_total');
  return card('ingest', 'Listeners',
    table('listeners', ['listener', 'lines/s', 'bytes/s', 'lines (total)'], rows, 'No listener.'),
    facts('ingest-facts', [
      ['Samples', isNum(samplesRate) || !isNum(cur.get('tallyd_samples_total')) ? fmtRate(samplesRate) : `${fmtNum(cur.get('tallyd_samples_total'))} in all`],
      ['Live keys', fmtNum(cur.get('tallyd_live_keys'))],
      ['Series keys', fmtNum(cur.get('tallyd_series_keys'))],
      ['Pending samples', fmtNum(cur.get('tallyd_pending_samples'))],
    ]));
}

function parseErrorsSection(cur, prev) {
  const by = new Map();
  for (const m of cur.all('tallyd_parse_errors_total')) {
    const e = by.get(m.labels.reason) || { total: 0, rate: prev ? 0 : null, per: [] };
    const r = rate(cur, prev, m.name, m.labels);
    e.total += isNum(m.value) ? m.value : 0;
    e.rate = r === null || e.rate === null ? null : e.rate + r;
    if (m.value > 0) e.per.push(`${m.labels.listener} ${fmtNum(m.value)}`);
    by.set(m.labels.reason, e);
  }
  const rows = [...by].sort((a, b) => b[1].total - a[1].total).map(([reason, e]) =>
    row({ 'data-reason': reason }, e.total > 0, reason,
      numTd('total', e.total), rateTd('per_second', e.rate), el('td', null, e.per.join(', '))));
  return card('parse', 'Parse errors',
    table('parse-errors', ['reason', 'total', 'per second', 'by listener'], rows, 'No parse error counter.'));
}

function dropsSection(cur, prev) {
  const drops = cur.all('tallyd_dropped_total');
  const rows = drops.map(({ name, labels: l, value }) =>
    row({ 'data-reason': l.reason, 'data-listener': l.listener }, value > 0, l.listener ? `${l.reason} (${l.listener})` : l.reason,
      numTd('total', value), rateTd('per_second', rate(cur, prev, name, l))));
  return card('dropped', 'Drops',
    drops.length > 0 && drops.every((m) => !(m.value > 0)) && el('p', { class: 'muted' }, 'Nothing dropped since the start.'),
    table('drops', ['reason', 'total', 'per second'], rows, 'No drop counter.'));
}

function fillRow(stream, used, free) {
  const total = (used || 0) + (free || 0);
  const pct = `${NF0.format(total > 0 ? (100 * used) / total : 0)}%`;
  return row({ 'data-stream': stream }, false, stream,
    numTd('used_bytes', used, fmtBytes(used)), numTd('free_bytes', free, fmtBytes(free)),
    el('td', { class: 'fill' }, el('meter', { min: 0, max: total || 1, value: used || 0, low: total * 0.5, high: total * 0.8, optimum: 0 }, pct), ` ${pct}`));
}

function walSection(cur) {
  const used = cur.get('tallyd_wal_used_bytes');
  if (used === undefined) return card('wal-card', 'WAL', el('p', { class: 'muted' }, 'The WAL is off.'));
  const rows = [fillRow('all', used, cur.get('tallyd_wal_free_bytes'))].concat(cur.all('tallyd_wal_stream_used_bytes')
    .map((m) => fillRow(m.labels.stream, m.value, cur.get('tallyd_wal_stream_free_bytes', { stream: m.labels.stream }))));
  const oldest = cur.get('tallyd_wal_oldest_unflushed_seconds');
  const syncErrors = cur.get('tallyd_wal_sync_errors_total');
  return card('wal-card', 'WAL',
    table('wal', ['stream', 'used', 'free', 'fill'], rows),
    facts('wal-facts', [
      ['Oldest unflushed', fmtDuration(oldest), { 'data-value': isNum(oldest) ? String(oldest) : '' }],
      ['Refused as full', fmtNum(cur.get('tallyd_wal_full_total'))],
      ['Sync errors', fmtNum(syncErrors), { class: syncErrors > 0 && 'nonzero' }],
    ]));
}

function backlogSection(st, cur) {
  const oldest = cur.get('tallyd_backlog_oldest_timestamp_seconds');
  const fact = (label, name, text) => [label, text, { 'data-metric': name, 'data-value': cur.get(name) }];
  return card('backlog-card', 'Spool backlog',
    cur.get('tallyd_spool_full') === 1 && el('p', { class: 'warn' }, 'The spool is at its hard limit: intervals stay open.'),
    facts('backlog', [
      fact('Intervals waiting', 'tallyd_backlog_batches', fmtNum(cur.get('tallyd_backlog_batches'))),
      fact('Rows waiting', 'tallyd_backlog_rows', fmtNum(cur.get('tallyd_backlog_rows'))),
      fact('Spool size', 'tallyd_spool_bytes', fmtBytes(cur.get('tallyd_spool_bytes'))),
      fact('Oldest waiting', 'tallyd_backlog_oldest_timestamp_seconds', oldest > 0 ? `${fmtDuration(st.time - oldest)} old` : 'none'),
    ]));
}

function latencySection(cur) {
  const ops = new Map();
  for (const m of cur.all('tallyd_latency_seconds')) {
    const key = { 0.5: 'p50', 0.99: 'p99', 1: 'max' }[Number(m.labels.quantile)];
    const o = ops.get(m.labels.op) || {};
    if (key && isNum(m.value)) o[key] = Math.round(m.value * 1e6) / 1e3;
    ops.set(m.labels.op, o);
  }
  const ms = (o, k) => numTd(k, o[k], isNum(o[k]) ? `${NF3.format(o[k])} ms` : '—');
  const rows = [...ops].map(([op, o]) => row({ 'data-op': op }, false, op, ms(o, 'p50'), ms(o, 'p99'), ms(o, 'max')));
  return card('latency-card', 'Latencies (last 1 to 2 minutes)',
    table('latency', ['operation', 'p50', 'p99', 'max'], rows, 'No operation recorded lately.'));
}

function clickhouseSection(cur, prev) {
  const rows = cur.all('tallyd_rows_written_total').map((m) => {
    const { table: t } = m.labels;
    const blocked = cur.get('tallyd_table_blocked', { table: t }) === 1;
    return row({ 'data-table': t, 'data-blocked': blocked ? 1 : 0 }, blocked, t,
      numTd('rows_total', m.value), rateTd('rows_per_second', rate(cur, prev, m.name, m.labels)),
      numTd('inserts_total', cur.get('tallyd_inserts_total', { table: t })),
      el('td', { 'data-column': 'blocked' }, blocked ? 'blocked (schema drift)' : 'ok'));
  });
  // Retried inserts: tallyd_clickhouse_errors_total{kind="retried"}.
  const retries = cur.get('tallyd_clickhouse_errors_total', { kind: 'retried' });
  const retryRate = rate(cur, prev, 'tallyd_clickhouse_errors_total', { kind: 'retried' });
  const schema = cur.get('tallyd_clickhouse_errors_total', { kind: 'schema' });
  const lag = cur.get('tallyd_rollup_lag_seconds');
  const pending = cur.get('tallyd_rollups_pending');
  return card('clickhouse-card', 'ClickHouse',
    table('clickhouse', ['table', 'rows written', 'rows/s', 'inserts', 'state'], rows, 'No table.'),
    facts('clickhouse-facts', [
      ['Retries', `${fmtNum(retries)}${retryRate > 0 ? ` (${fmtRate(retryRate)})` : ''}`,
        { 'data-metric': 'retries', 'data-value': retries, class: retries > 0 && 'nonzero' }],
      schema !== undefined && ['Schema errors', fmtNum(schema), { class: schema > 0 && 'nonzero' }],
      lag !== undefined && ['Rollup lag', fmtDuration(lag)],
      pending !== undefined && ['Rollups pending', fmtNum(pending)],
    ]));
}

function metricLink(m) {
  const q = new URLSearchParams({ name: m.name });
  if (TYPES.includes(m.type)) q.set('type', m.type);
  return el('a', { href: `/?${q}` }, m.name);
}

function topSection(st) {
  const keys = (st.top_keys || []).map((m) => row({ 'data-metric': m.name }, false, metricLink(m),
    el('td', null, m.type), numTd('keys', m.keys)));
  const rates = (st.top_samples || []).map((m) => row({ 'data-metric': m.name }, false, metricLink(m),
    el('td', null, m.type), numTd('samples', m.samples), numTd('per_second', m.per_second, fmtRate(m.per_second))));
  return card('top-card', 'Top metrics', el('div', { class: 'pair' },
    el('div', null, el('h3', null, 'By live keys'),
      table('top-keys', ['metric', 'type', 'keys'], keys, 'No metric in this interval.')),
    el('div', null, el('h3', null, 'By samples per second'),
      table('top-samples', ['metric', 'type', 'samples', 'per second'], rates, 'No metric in this interval.'))));
}

/** On an edge (upstreams) or an aggregator (edges), or once anything was forwarded. */
function fleetSection(st, cur, prev) {
  const upstreams = cur.all('tallyd_forward_upstream_up');
  const edges = cur.all('tallyd_edge_lag_seconds');
  const seen = cur.get('tallyd_edges_seen');
  const forwarded = cur.list.some((m) => m.name.startsWith('tallyd_forward_') && m.value > 0);
  if (!upstreams.length && !edges.length && seen === undefined && !forwarded) return null;
  const oldest = cur.get('tallyd_backlog_oldest_timestamp_seconds');
  const rows = upstreams.map((m) => {
    const u = m.labels;
    return row({ 'data-upstream': u.upstream }, m.value !== 1, u.upstream,
      el('td', { 'data-column': 'up' }, m.value === 1 ? 'up' : 'down'),
      numTd('rows_total', cur.get('tallyd_forward_upstream_rows_total', u)),
      rateTd('rows_per_second', rate(cur, prev, 'tallyd_forward_upstream_rows_total', u)),
      numTd('waiting', cur.get('tallyd_forward_upstream_waiting', u)));
  });
  const edgeRows = edges.map((m) => row({ 'data-edge': m.labels.edge }, m.value > 60, m.labels.edge,
    numTd('lag_seconds', m.value, fmtDuration(m.value))));
  return card('fleet', 'Fleet',
    rows.length > 0 && table('upstreams', ['upstream', 'state', 'rows', 'rows/s', 'waiting'], rows),
    facts('fleet-facts', [
      (upstreams.length || forwarded) && ['Upstream lag', oldest > 0 ? fmtDuration(st.time - oldest) : 'none waiting'],
      forwarded && ['Rows forwarded', fmtNum(cur.get('tallyd_forward_rows_total'))],
      forwarded && ['Retries', fmtNum(cur.get('tallyd_forward_retries_total'))],
      seen !== undefined && ['Edges seen (5 min)', fmtNum(seen)],
      seen !== undefined && ['Edges lagging', fmtNum(cur.get('tallyd_edges_lagging'))],
    ]),
    edgeRows.length > 0 && table('edges', ['edge', 'lag'], edgeRows));
}

/** Replaces only the sections that changed, so a text selection survives a poll. */
function reconcile(box, all) {
  const nodes = all.filter(Boolean);
  nodes.forEach((node, i) => {
    const old = box.children[i];
    if (!old) box.append(node);
    else if (!old.isEqualNode(node)) old.replaceWith(node);
  });
  while (box.children.length > nodes.length) box.lastElementChild.remove();
}

function renderStatus(st, cur, prev) {
  $('about').textContent = `${st.host || ''} · tallyd ${st.version || ''} · flush every ${st.flush_interval} s · ${fmtDateTime(st.time)}`;
  reconcile($('status-sections'), [
    healthSection(st),
    clickhouseDown(st),
    listenersSection(cur, prev),
    parseErrorsSection(cur, prev),
    dropsSection(cur, prev),
    walSection(cur),
    backlogSection(st, cur),
    latencySection(cur),
    clickhouseSection(cur, prev),
    topSection(st),
    fleetSection(st, cur, prev),
  ].filter(Boolean));
}

/** Polls /api/status every second; rates are differences between polls. */
function initStatus() {
  let prev = null;
  const poll = async () => {
    const started = Date.now();
    try {
      const st = await api('/api/status');
      const cur = samples(st);
      if (prev && !(prev.time < cur.time)) prev = null;
      renderStatus(st, cur, prev);
      prev = cur;
      showError('');
      setState('ready');
    } catch (e) {
      showError(e.message);
      setState('error');
    }
    setTimeout(poll, Math.max(100, 1000 - (Date.now() - started)));
  };
  poll();
}

/* ---------- Start ---------- */

function init() {
  const status = /^\/status\/?$/.test(location.pathname);
  $(status ? 'explorer-view' : 'status-view').remove();
  $(status ? 'status-view' : 'explorer-view').hidden = false;
  $(status ? 'nav-status' : 'nav-explorer').setAttribute('aria-current', 'page');
  document.title = status ? 'tallyd status' : 'tallyd explorer';
  if (status) initStatus();
  else initExplorer();
}

init();
