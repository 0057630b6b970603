// rollout.js: one firmware rollout: its version, phases, failure budget and each device's
// update stage, live from the event stream; pause, resume or abort it.

import { api, follow, onAction } from './api.js';
import { coalesce, el, replace, when } from './dom.js';
import { counts, progress } from './rollouts.js';

/** How often a rollout is read again, events or not (download percentages). */
const POLL_MS = 2000;

function deviceRow(d) {
  const stage = d.percent !== undefined && d.percent !== null && d.state === 'downloading' ? `${d.state} ${d.percent}%` : d.state;
  return el('tr', { dataset: { device: d.device } },
    el('td', {}, el('a', { href: `#/device/${encodeURIComponent(d.device)}` }, d.device)),
    el('td', {}, el('span', { class: `badge ${d.state}` }, stage)),
    el('td', {}, d.version ?? '—'),
    el('td', { class: 'output' }, d.reason ?? ''),
    el('td', {}, when(d.updated_at)));
}

export async function show(main, arg, _query, { setLive }) {
  const id = Number(arg);
  const facts = el('dl', { class: 'info', id: 'rollout-facts' });
  const bar = el('div', { id: 'rollout-progress' });
  const body = el('tbody', { id: 'rollout-devices' });
  const error = el('p', { class: 'error' });
  const buttons = Object.fromEntries(['pause', 'resume', 'abort'].map((action) => [action,
    el('button', { type: 'button', id: `rollout-${action}`, hidden: true }, `${action[0].toUpperCase()}${action.slice(1)}`)]));
  replace(main, el('h1', {}, `Rollout #${id}`), facts, bar, Object.values(buttons), error,
    el('table', { class: 'rollout-devices' },
      el('thead', {}, el('tr', {}, ['Device', 'Stage', 'Version', 'Reason', 'Updated'].map((h) => el('th', {}, h)))),
      body));
  const fact = (name, value) => [el('dt', {}, name), el('dd', {}, value)];
  const load = async () => {
    const r = await api(`/api/v1/rollouts/${id}`);
    replace(facts,
      fact('version', r.version),
      fact('devices', `${r.select} (${r.counts?.targets ?? 0})`),
      fact('phases', `canary ${r.canary}, then ${(r.steps ?? []).map((s) => `${s}%`).join(', ') || '100%'}`),
      fact('failure budget', `${r.max_failures}%`),
      fact('state', r.reason ? `${r.state}: ${r.reason}` : r.state),
      fact('counts', counts(r.counts)),
      fact('started', when(r.created_at)));
    replace(bar, progress(r));
    buttons.pause.hidden = r.state !== 'running';
    buttons.resume.hidden = r.state !== 'paused';
    buttons.abort.hidden = r.state !== 'running' && r.state !== 'paused';
    replace(body, (r.devices ?? []).map(deviceRow));
  };
  for (const [action, button] of Object.entries(buttons)) {
    onAction(button, `/api/v1/rollouts/${id}/${action}`, error, load);
  }
  const soon = coalesce(() => load().catch(() => {}), 300);
  const stream = follow({}, {
    rollout: (ev) => {
      if (ev.id === id) soon();
    },
    lagged: soon,
  }, setLive);
  await load();
  const poll = setInterval(() => load().catch(() => {}), POLL_MS);
  return () => {
    clearInterval(poll);
    stream.close();
  };
}
