// overview.js: the fleet at a glance: presence counts, connections, readings per second
// and commit latency (computed from /metrics, the numbers Prometheus scrapes), and the
// recent presence and command events, all kept current by the event stream and a poll.

import { api, follow } from './api.js';
import { el, replace, when } from './dom.js';

/** How often the metrics are read again. */
const METRICS_EVERY_MS = 2000;
/** Events kept in the list. */
const RECENT = 50;

/** Sums the samples of a metric in Prometheus text, over all its label sets. */
export function metric(text, name) {
  let total = 0;
  let seen = false;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== ' ' && rest[0] !== '{') continue;
    const value = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (Number.isFinite(value)) {
      total += value;
      seen = true;
    }
  }
  return seen ? total : null;
}

function card(id, label) {
  return el('div', { class: 'card' }, el('div', { class: 'value', id }, '…'), el('div', { class: 'label' }, label));
}

/** One line for a presence or command event. */
export function eventLine(ev) {
  if (ev.type === 'presence') {
    return el('li', { class: ev.online ? 'online' : 'offline' },
      el('time', {}, when(ev.at_ms)), ' ',
      el('a', { href: `#/device/${encodeURIComponent(ev.device)}` }, ev.device), ' ',
      ev.online ? 'came online' : `went offline (${ev.cause})`);
  }
  const c = ev.command;
  const outcome = c.result ? ` → ${c.result.output}` : c.reason ? ` (${c.reason})` : '';
  return el('li', { class: `command ${c.state}` },
    el('time', {}, when(ev.at_ms)), ' ',
    el('a', { href: `#/device/${encodeURIComponent(c.device)}` }, c.device), ' ',
    `command ${c.id} ${c.name}: ${c.state}${outcome}`);
}

export async function show(main, _arg, _query, { setLive }) {
  const events = el('ul', { class: 'events', id: 'recent-events' });
  replace(main,
    el('h1', {}, 'Fleet'),
    el('div', { class: 'cards' },
      card('count-online', 'online'), card('count-offline', 'offline'), card('count-never', 'never connected'),
      card('connections', 'connections'), card('readings-rate', 'readings/s stored'), card('commit-latency', 'commit latency')),
    el('h2', {}, 'Recent events'),
    events);
  const set = (id, text) => {
    const node = document.getElementById(id);
    if (node) node.textContent = text;
  };

  let countsQueued = false;
  const refreshCounts = async () => {
    countsQueued = false;
    const { counts } = await api('/api/v1/devices?limit=0');
    set('count-online', counts.online);
    set('count-offline', counts.offline);
    set('count-never', counts.never_connected);
  };
  // Presence events come in bursts (a fleet reconnecting): count at most once a second.
  const countSoon = () => {
    if (!countsQueued) {
      countsQueued = true;
      setTimeout(() => refreshCounts().catch(() => {}), 1000);
    }
  };

  let previous = null;
  const refreshMetrics = async () => {
    const text = await api('/metrics');
    const sample = {
      at: performance.now(),
      stored: metric(text, 'hub_readings_stored_total') ?? 0,
      commitSum: metric(text, 'hub_store_commit_seconds_sum') ?? 0,
      commitCount: metric(text, 'hub_store_commit_seconds_count') ?? 0,
    };
    set('connections', metric(text, 'hub_connections') ?? 0);
    if (previous) {
      const seconds = (sample.at - previous.at) / 1000;
      set('readings-rate', ((sample.stored - previous.stored) / seconds).toFixed(1));
      const commits = sample.commitCount - previous.commitCount;
      set('commit-latency', commits > 0 ? `${((1000 * (sample.commitSum - previous.commitSum)) / commits).toFixed(2)} ms` : 'no commits');
    }
    previous = sample;
  };

  const add = (ev) => {
    events.prepend(eventLine(ev));
    while (events.children.length > RECENT) events.lastChild.remove();
  };
  // From the start of what the hub keeps, so the list begins with the recent past.
  const stream = follow({ last_event_id: '0-0' }, {
    presence: (ev) => {
      add(ev);
      countSoon();
    },
    command: add,
    lagged: () => countSoon(),
  }, setLive);

  await Promise.all([refreshCounts(), refreshMetrics()]);
  const poll = setInterval(() => refreshMetrics().catch(() => {}), METRICS_EVERY_MS);
  return () => {
    clearInterval(poll);
    stream.close();
  };
}
