// job.js: one job: what it sends to which devices, its progress and each device's state,
// live from the event stream; cancel while it runs.

import { api, follow, onAction } from './api.js';
import { coalesce, el, replace, when } from './dom.js';
import { counts, progress } from './jobs.js';

/** How often a running job is read again, events or not (presence of its devices). */
const POLL_MS = 2000;

function deviceRow(d) {
  const outcome = d.result ? d.result.output : d.reason ?? '';
  return el('tr', { dataset: { device: d.device } },
    el('td', {}, el('a', { href: `#/device/${encodeURIComponent(d.device)}` }, d.device)),
    el('td', {}, el('span', { class: `badge ${d.state}` }, d.state)),
    el('td', {}, d.online ? 'online' : 'offline'),
    el('td', {}, d.command ?? '—'),
    el('td', { class: 'output' }, outcome));
}

export async function show(main, arg, _query, { setLive }) {
  const id = Number(arg);
  const title = el('h1', {}, `Job #${id}`);
  const facts = el('dl', { class: 'info', id: 'job-facts' });
  const bar = el('div', { id: 'job-progress' });
  const body = el('tbody', { id: 'job-devices' });
  const error = el('p', { class: 'error' });
  const cancel = el('button', { type: 'button', id: 'job-cancel', hidden: true }, 'Cancel job');
  replace(main, title, facts, bar, cancel, error,
    el('table', { class: 'job-devices' },
      el('thead', {}, el('tr', {}, ['Device', 'State', 'Presence', 'Command', 'Result'].map((h) => el('th', {}, h)))),
      body));
  const fact = (name, value) => [el('dt', {}, name), el('dd', {}, value)];
  const load = async () => {
    const job = await api(`/api/v1/jobs/${id}`);
    replace(facts,
      fact('command', `${job.command} ${JSON.stringify(job.args)}`),
      fact('devices', `${job.select} (${job.targets})`),
      fact('state', job.reason ? `${job.state}: ${job.reason}` : job.state),
      fact('counts', counts(job.counts)),
      fact('created', when(job.created_at)),
      fact('ended', when(job.finished_at)));
    replace(bar, progress(job));
    cancel.hidden = job.state !== 'running';
    replace(body, job.devices.map(deviceRow));
  };
  onAction(cancel, `/api/v1/jobs/${id}/cancel`, error, load);
  const soon = coalesce(() => load().catch(() => {}), 300);
  const stream = follow({}, {
    job: (ev) => {
      if (ev.job.id === id) soon();
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
