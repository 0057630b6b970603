// rollouts.js: firmware rollouts (`hub rollout start`): the newest ones with their progress,
// kept current by the event stream's rollout events.

import { api, follow } from './api.js';
import { coalesce, el, progressBar, replace, when } from './dom.js';

/** Rollouts listed. */
const LIST = 50;
/** Outcomes counted as done in the progress bar. */
const DONE = ['succeeded', 'failed', 'rolled_back'];
/** Stages in the order the counts are written. */
const ORDER = ['succeeded', 'in_progress', 'offered', 'pending', 'failed', 'rolled_back'];

/** A rollout's progress: a bar of devices with an outcome out of its targets. */
export function progress(rollout) {
  const c = rollout.counts ?? {};
  return progressBar(DONE.reduce((n, s) => n + (c[s] ?? 0), 0), c.targets ?? 0);
}

/** A rollout's counts in words, the non-zero ones. */
export function counts(c = {}) {
  return ORDER.filter((s) => c[s]).map((s) => `${c[s]} ${s.replace('_', ' ')}`).join(', ') || '—';
}

function row(r) {
  return el('tr', { dataset: { rollout: r.id } },
    el('td', {}, el('a', { href: `#/rollout/${r.id}` }, `#${r.id}`)),
    el('td', {}, el('span', { class: `badge ${r.state}` }, r.state)),
    el('td', {}, r.version),
    el('td', {}, r.select),
    el('td', {}, progress(r)),
    el('td', { class: 'counts' }, counts(r.counts)),
    el('td', {}, when(r.created_at)));
}

export async function show(main, _arg, _query, { setLive }) {
  const body = el('tbody', { id: 'rollout-rows' });
  const empty = el('p', { class: 'hint', id: 'rollouts-empty' });
  replace(main,
    el('h1', {}, 'Rollouts'),
    el('table', { class: 'rollouts' },
      el('thead', {}, el('tr', {}, ['Rollout', 'State', 'Version', 'Devices', 'Progress', 'Counts', 'Started'].map((h) => el('th', {}, h)))),
      body),
    empty);
  const load = async () => {
    const rollouts = await api(`/api/v1/rollouts?limit=${LIST}`);
    replace(body, rollouts.map(row));
    empty.textContent = rollouts.length ? '' : 'No rollouts yet: `hub rollout start --firmware V --tag KEY=VALUE` starts one.';
  };
  // Rollout events come once per change of a rollout's counts: reload at most twice a second.
  const soon = coalesce(() => load().catch(() => {}), 500);
  const stream = follow({}, { rollout: soon, lagged: soon }, setLive);
  await load();
  return () => stream.close();
}
