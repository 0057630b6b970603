// devices.js: the device list: search by id, presence and tag filters (the hub's selector
// grammar), sortable columns, and server-side pages, so that a fleet of tens of thousands
// renders one page at a time. Presence changes arrive over the event stream.

import { api, follow } from './api.js';
import { el, replace, ago, rtt, presence } from './dom.js';

/** Devices per page. */
export const PAGE = 50;

const COLUMNS = [
  ['id', 'Device'],
  ['online', 'Presence'],
  ['firmware', 'Firmware'],
  ['last_seen', 'Last seen'],
  ['rtt', 'RTT'],
  [null, 'Tags'],
];

/** The selector for the filters: presence word and KEY=VALUE tags. */
function selector(presenceWord, tags) {
  const terms = tags.split(',').map((t) => t.trim()).filter(Boolean);
  if (presenceWord) terms.push(presenceWord);
  return terms.join(',');
}

function row(device) {
  const [word, cls] = presence(device);
  const tags = Object.entries(device.tags ?? {}).map(([k, v]) => `${k}=${v}`).join(', ');
  return el('tr', { dataset: { device: device.id } },
    el('td', {}, el('a', { href: `#/device/${encodeURIComponent(device.id)}` }, device.id)),
    el('td', {}, el('span', { class: `badge ${cls}` }, word)),
    el('td', {}, device.firmware || '—'),
    el('td', {}, ago(device.last_seen)),
    el('td', {}, rtt(device.rtt_us)),
    el('td', { class: 'tags' }, tags));
}

export async function show(main, _arg, query, { setLive }) {
  const state = {
    q: query.get('q') ?? '',
    presence: query.get('presence') ?? '',
    tags: query.get('tags') ?? '',
    sort: query.get('sort') ?? 'id',
    offset: Number(query.get('offset') ?? 0),
  };
  const search = el('input', { id: 'device-search', type: 'search', placeholder: 'search ids', value: state.q });
  const presenceSelect = el('select', { id: 'device-presence' },
    ['', 'online', 'offline', 'never-connected'].map((p) => el('option', { value: p, selected: p === state.presence }, p || 'any presence')));
  const tagInput = el('input', { id: 'device-tags', placeholder: 'site=b,hw=rev2', value: state.tags });
  const head = el('tr');
  const body = el('tbody', { id: 'device-rows' });
  const summary = el('span', { id: 'device-summary' });
  const error = el('p', { class: 'error' });
  const prev = el('button', { type: 'button', id: 'page-prev' }, '‹ previous');
  const next = el('button', { type: 'button', id: 'page-next' }, 'next ›');
  replace(main,
    el('h1', {}, 'Devices'),
    el('div', { class: 'filters' }, search, presenceSelect, tagInput),
    error,
    el('table', { class: 'devices' }, el('thead', {}, head), body),
    el('div', { class: 'pager' }, prev, summary, next));

  let generation = 0;
  const load = async () => {
    const mine = ++generation;
    const params = new URLSearchParams({ offset: state.offset, limit: PAGE, sort: state.sort });
    if (state.q) params.set('q', state.q);
    const select = selector(state.presence, state.tags);
    if (select) params.set('select', select);
    try {
      const page = await api(`/api/v1/devices?${params}`);
      if (mine !== generation) return;
      error.textContent = '';
      replace(body, page.devices.map(row));
      const last = Math.min(state.offset + PAGE, page.total);
      summary.textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : 'no devices match';
      prev.disabled = state.offset === 0;
      next.disabled = last >= page.total;
    } catch (err) {
      error.textContent = err.message;
    }
  };
  const drawHead = () => {
    replace(head, COLUMNS.map(([key, label]) => {
      if (!key) return el('th', {}, label);
      const current = state.sort.replace(/^-/, '') === key;
      const arrow = current ? (state.sort.startsWith('-') ? ' ▼' : ' ▲') : '';
      return el('th', {}, el('button', {
        type: 'button', class: 'sort', dataset: { sort: key },
        onclick: () => {
          state.sort = current && !state.sort.startsWith('-') ? `-${key}` : key;
          state.offset = 0;
          drawHead();
          load();
        },
      }, label + arrow));
    }));
  };
  const refilter = () => {
    state.q = search.value.trim();
    state.presence = presenceSelect.value;
    state.tags = tagInput.value.trim();
    state.offset = 0;
    load();
  };
  let typing = null;
  search.addEventListener('input', () => {
    clearTimeout(typing);
    typing = setTimeout(refilter, 200);
  });
  presenceSelect.addEventListener('change', refilter);
  tagInput.addEventListener('change', refilter);
  prev.addEventListener('click', () => {
    state.offset = Math.max(0, state.offset - PAGE);
    load();
  });
  next.addEventListener('click', () => {
    state.offset += PAGE;
    load();
  });

  // A presence change updates its row at once; the page is read again (at most every
  // 2 s) when the change may move devices in or out of it.
  let reloadQueued = false;
  const reloadSoon = () => {
    if (reloadQueued) return;
    reloadQueued = true;
    setTimeout(() => {
      reloadQueued = false;
      load();
    }, 2000);
  };
  const stream = follow({}, {
    presence: (ev) => {
      const tr = body.querySelector(`tr[data-device="${CSS.escape(ev.device)}"]`);
      if (tr) {
        const badge = tr.querySelector('.badge');
        badge.textContent = ev.online ? 'online' : 'offline';
        badge.className = `badge ${ev.online ? 'online' : 'offline'}`;
      }
      if (!tr || state.presence || state.sort.replace(/^-/, '') === 'online') reloadSoon();
    },
    lagged: reloadSoon,
  }, setLive);

  drawHead();
  await load();
  return () => {
    stream.close();
    clearTimeout(typing);
  };
}
