// device.js: one device: presence and its history, firmware, RTT, reported and desired
// state, a live chart of a metric (stored history from the query API, then the readings
// the event stream carries), a command form with its result, and the command history.

import { api, follow } from './api.js';
import { el, replace, when, ago, rtt, presence } from './dom.js';

/** The chart's time ranges: label, seconds. */
const RANGES = [['5 min', 300], ['15 min', 900], ['1 hour', 3600], ['6 hours', 21600], ['1 day', 86400], ['7 days', 604800]];
/** Points the chart asks the store for at most (more readings are averaged in windows). */
const CHART_POINTS = 600;

function json(value) {
  return value === undefined ? '—' : JSON.stringify(value, null, 2);
}

function commandRow(c) {
  const output = c.result ? c.result.output : c.reason ?? '';
  return el('tr', { dataset: { command: c.id } },
    el('td', {}, String(c.id)),
    el('td', {}, when(c.created_at)),
    el('td', {}, c.name),
    el('td', { class: 'mono' }, JSON.stringify(c.args)),
    el('td', {}, el('span', { class: `badge ${c.state}` }, c.state)),
    el('td', { class: 'mono output' }, output));
}

export async function show(main, id, _query, { setLive }) {
  const base = `/api/v1/devices/${encodeURIComponent(id)}`;
  const info = el('dl', { class: 'info', id: 'device-info' });
  const history = el('ul', { class: 'events', id: 'presence-history' });
  const reported = el('pre', { id: 'reported-state' });
  const desired = el('pre', { id: 'desired-state' });
  const metricSelect = el('select', { id: 'metric' });
  const rangeSelect = el('select', { id: 'range' }, RANGES.map(([label, s]) => el('option', { value: s, selected: s === 900 }, label)));
  const chartBox = el('div', { id: 'chart' });
  const pointCount = el('span', { id: 'chart-points', class: 'hint' });
  const nameInput = el('input', { id: 'command-name', required: true, placeholder: 'led', pattern: '[A-Za-z0-9_.:/\\-]{1,64}' });
  const argsInput = el('textarea', { id: 'command-args', rows: 2, placeholder: '{"on": true}' });
  const result = el('pre', { id: 'command-result', class: 'output' });
  const commands = el('tbody', { id: 'command-history' });
  const form = el('form', { id: 'command-form', class: 'command' },
    el('label', {}, 'Command ', nameInput), el('label', {}, 'Arguments (JSON) ', argsInput),
    el('button', { type: 'submit' }, 'Send'));
  replace(main,
    el('h1', {}, el('a', { href: '#/devices' }, 'Devices'), ' / ', el('span', { id: 'device-id' }, id)),
    el('div', { class: 'columns' },
      el('section', {}, el('h2', {}, 'Device'), info),
      el('section', {}, el('h2', {}, 'Presence history'), history)),
    el('section', {}, el('h2', {}, 'Telemetry'), el('div', { class: 'filters' }, metricSelect, rangeSelect, pointCount), chartBox),
    el('section', {}, el('h2', {}, 'Send a command'), form, result),
    el('section', {}, el('h2', {}, 'Command history'),
      el('table', {}, el('thead', {}, el('tr', {}, ['Id', 'Created', 'Name', 'Arguments', 'State', 'Result'].map((h) => el('th', {}, h)))), commands)),
    el('div', { class: 'columns' },
      el('section', {}, el('h2', {}, 'Reported state'), reported),
      el('section', {}, el('h2', {}, 'Desired state'), desired)));

  const loadDevice = async () => {
    const d = await api(base);
    const [word, cls] = presence(d);
    const tags = Object.entries(d.tags ?? {}).map(([k, v]) => `${k}=${v}`).join(', ');
    const rows = [
      ['Presence', el('span', { class: `badge ${cls}`, id: 'device-presence' }, word)],
      ['Firmware', d.firmware || '—'],
      ['Ping RTT', rtt(d.rtt_us)],
      ['Last seen', `${when(d.last_seen)} (${ago(d.last_seen)})`],
      ['Connected at', when(d.connected_at)],
      [d.online ? 'Address' : 'Last address', d.remote_addr || '—'],
      ['Last cause', d.last_cause || '—'],
      ['Tags', tags || '—'],
      ['Capabilities', (d.capabilities ?? []).join(', ') || '—'],
      ['Registered', when(d.registered_at)],
    ];
    replace(info, rows.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
    if (d.state && Object.keys(d.state).length) reported.textContent = json(d.state);
  };
  const loadPresence = async () => {
    const { history: changes } = await api(`${base}/presence?limit=20`);
    if (changes === null) {
      replace(history, el('li', {}, 'This hub keeps no presence history (cluster registry).'));
      return;
    }
    replace(history, changes.length ? changes.map((c) => el('li', { class: c.online ? 'online' : 'offline' },
      el('time', {}, when(c.at_ms)), ' ', c.online ? 'online' : `offline (${c.cause})`)) : el('li', {}, 'never connected'));
  };
  const loadState = async () => {
    const twin = await api(`${base}/state`);
    reported.textContent = json(twin.reported);
    desired.textContent = json(twin.desired);
  };
  const loadCommands = async () => {
    const { commands: list } = await api(`${base}/commands?limit=20`);
    replace(commands, list.map(commandRow));
  };

  // The chart: [seconds since the epoch], [values] for the metric picked.
  let xs = [];
  let ys = [];
  let plot = null;
  const draw = () => {
    pointCount.textContent = `${xs.length} points`;
    pointCount.dataset.points = String(xs.length);
    if (!window.uPlot) return;
    if (!plot) {
      plot = new window.uPlot({
        width: Math.max(320, chartBox.clientWidth || main.clientWidth - 40),
        height: 260,
        scales: { x: { time: true } },
        series: [{}, { label: metricSelect.value || 'value', stroke: '#2a6fdb', width: 1.5, points: { show: xs.length < 60 } }],
      }, [xs, ys], chartBox);
    } else {
      plot.setData([xs, ys]);
    }
  };
  // Readings that arrive while the history loads wait here: the history may end before
  // them (they are published as received, before they are stored), and replacing the
  // points with it must not lose them.
  let waiting = [];
  const loadChart = async () => {
    waiting = waiting ?? [];
    const range = Number(rangeSelect.value);
    const params = new URLSearchParams({ since: `${range}s`, limit: String(CHART_POINTS), metric: metricSelect.value });
    let rows = [];
    try {
      if (metricSelect.value) {
        // The raw readings when there are few; otherwise means over CHART_POINTS windows.
        const raw = await api(`${base}/telemetry?${params}`);
        rows = raw.rows;
        if (raw.truncated) {
          params.set('every', `${Math.ceil((range * 1000) / CHART_POINTS)}ms`);
          params.set('agg', 'mean');
          params.set('limit', String(CHART_POINTS * 2));
          ({ rows } = await api(`${base}/telemetry?${params}`));
        }
      }
    } catch (err) {
      waiting = null;
      throw err;
    }
    xs = rows.map((r) => r.ts / 1000);
    ys = rows.map((r) => r.value);
    const held = waiting;
    waiting = null;
    for (const [metric, ts, value] of held) addPoint(metric, ts, value);
    plot?.destroy();
    plot = null;
    draw();
  };
  const addMetric = (name) => {
    if ([...metricSelect.options].some((o) => o.value === name)) return false;
    metricSelect.append(el('option', { value: name }, name));
    return true;
  };
  const loadMetrics = async () => {
    const range = Number(rangeSelect.value);
    // One window per metric over the range: the names of the metrics that have readings.
    const { rows } = await api(`${base}/telemetry?since=${range}s&every=${range}s&agg=count&limit=1000`);
    for (const name of [...new Set(rows.map((r) => r.metric))].sort()) addMetric(name);
  };
  /** Appends a reading of the metric shown; whether it was one. */
  const addPoint = (metric, ts, value) => {
    const t = ts / 1000;
    if (metric !== metricSelect.value || (xs.length && t <= xs[xs.length - 1])) return false;
    xs.push(t);
    ys.push(value);
    return true;
  };
  const onReadings = (ev) => {
    let added = false;
    let fresh = false;
    for (const [metric, ts, value] of ev.readings) {
      if (addMetric(metric) && metricSelect.options.length === 1) fresh = true;
      if (waiting) waiting.push([metric, ts, value]);
      else if (addPoint(metric, ts, value)) added = true;
    }
    if (fresh) {
      loadChart();
      return;
    }
    if (!added) return;
    const from = Date.now() / 1000 - Number(rangeSelect.value);
    while (xs.length && xs[0] < from) {
      xs.shift();
      ys.shift();
    }
    draw();
  };
  metricSelect.addEventListener('change', loadChart);
  rangeSelect.addEventListener('change', async () => {
    await loadMetrics();
    await loadChart();
  });

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    result.textContent = 'sending…';
    result.className = 'output';
    let args = {};
    try {
      if (argsInput.value.trim()) args = JSON.parse(argsInput.value);
    } catch (err) {
      result.textContent = `The arguments are not JSON: ${err.message}`;
      return;
    }
    try {
      const created = await api(`${base}/commands`, { method: 'POST', body: { name: nameInput.value.trim(), args } });
      result.textContent = created.device_online ? `command ${created.id} sent; waiting for its result…` : `command ${created.id} queued: the device is offline`;
      const done = await api(`/api/v1/commands/${created.id}?wait=30s`);
      const outcome = done.result ? `${done.result.ok ? 'ok' : 'failed'} (code ${done.result.code})` : done.reason ?? '';
      result.replaceChildren(el('span', { class: `badge ${done.state}`, id: 'command-state' }, done.state), ` command ${done.id} ${outcome}\n`,
        el('span', { id: 'command-output' }, done.result?.output ?? ''));
    } catch (err) {
      result.textContent = err.message;
      result.className = 'output error';
    }
  });

  const stream = follow({ device: id, readings: 'true' }, {
    presence: () => {
      loadDevice().catch(() => {});
      loadPresence().catch(() => {});
    },
    command: () => loadCommands().catch(() => {}),
    state: () => loadState().catch(() => {}),
    readings: onReadings,
    lagged: () => loadChart().catch(() => {}),
  }, setLive);

  await Promise.all([loadDevice(), loadPresence(), loadCommands(), loadState().catch(() => {}), loadMetrics()]);
  if (metricSelect.options.length) await loadChart();
  else draw();
  const tick = setInterval(() => loadDevice().catch(() => {}), 10000);
  return () => {
    clearInterval(tick);
    stream.close();
    plot?.destroy();
  };
}
