// jobs.js: jobs (one command over many devices, made by `hub send --tag ...` or the API):
// the newest ones with their progress, kept current by the event stream's job events.

import { api, follow } from './api.js';
import { coalesce, el, progressBar, replace, when } from './dom.js';

/** Jobs listed. */
const LIST = 50;
/** Final command states, counted as done in the progress bar. */
const DONE = ['succeeded', 'failed', 'expired', 'cancelled'];
/** States in the order the counts are written. */
const ORDER = ['succeeded', 'failed', 'queued', 'sent', 'acked', 'expired', 'cancelled', 'pending', 'skipped'];

/** A job's progress: a bar of finished commands out of its targets. */
export function progress(job) {
  const c = job.counts ?? {};
  return progressBar(DONE.reduce((n, s) => n + (c[s] ?? 0), 0), job.targets);
}

/** A job's counts in words, the non-zero ones. */
export function counts(c = {}) {
  return ORDER.filter((s) => c[s]).map((s) => `${c[s]} ${s}`).join(', ') || '—';
}

function row(job) {
  return el('tr', { dataset: { job: job.id } },
    el('td', {}, el('a', { href: `#/job/${job.id}` }, `#${job.id}`)),
    el('td', {}, el('span', { class: `badge ${job.state}` }, job.state)),
    el('td', {}, job.command),
    el('td', {}, job.select),
    el('td', {}, progress(job)),
    el('td', { class: 'counts' }, counts(job.counts)),
    el('td', {}, when(job.created_at)));
}

export async function show(main, _arg, _query, { setLive }) {
  const body = el('tbody', { id: 'job-rows' });
  const empty = el('p', { class: 'hint', id: 'jobs-empty' });
  replace(main,
    el('h1', {}, 'Jobs'),
    el('table', { class: 'jobs' },
      el('thead', {}, el('tr', {}, ['Job', 'State', 'Command', 'Devices', 'Progress', 'Counts', 'Created'].map((h) => el('th', {}, h)))),
      body),
    empty);
  const load = async () => {
    const { jobs } = await api(`/api/v1/jobs?limit=${LIST}`);
    replace(body, jobs.map(row));
    empty.textContent = jobs.length ? '' : 'No jobs yet: `hub send --tag KEY=VALUE COMMAND` makes one.';
  };
  // Job events come once per change of a job's counts: reload at most twice a second.
  const soon = coalesce(() => load().catch(() => {}), 500);
  const stream = follow({}, { job: soon, lagged: soon }, setLive);
  await load();
  return () => stream.close();
}
