// dom.js: building the page from data without markup. Every string becomes a text node
// (textContent), so what devices send (ids, metric names, state, command output) is shown
// as text and never parsed as HTML.

/** Creates an element with attributes and children (strings become text nodes). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replaces a node's children. */
export function replace(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

/** A time (ms since the epoch) as local date and time; '—' for none. */
export function when(ms) {
  if (!ms) return '—';
  return new Date(ms).toLocaleString(undefined, { hour12: false });
}

/** How long ago a time was, roughly. */
export function ago(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

/** A round trip in microseconds as milliseconds. */
export function rtt(us) {
  return us === null || us === undefined ? '—' : `${(us / 1000).toFixed(1)} ms`;
}

/** A device's presence word and its CSS class. */
export function presence(device) {
  if (device.online) return ['online', 'online'];
  if (!device.first_seen) return ['never connected', 'never'];
  return ['offline', 'offline'];
}

/** The page's hash route as [name, argument, query]. */
export function route() {
  const hash = location.hash.replace(/^#\/?/, '');
  const [path, query = ''] = hash.split('?');
  const [name, ...rest] = path.split('/');
  return [name || 'overview', rest.map(decodeURIComponent).join('/'), new URLSearchParams(query)];
}

/** A progress bar of `done` out of `total`, with the numbers beside it. */
export function progressBar(done, total) {
  return el('span', { class: 'progress' },
    el('progress', { max: Math.max(total, 1), value: done }), ` ${done}/${total}`);
}

/**
 * Returns a function that calls `fn` once, `ms` after the first of any burst of calls
 * (events come in bursts; one reload covers them all).
 */
export function coalesce(fn, ms) {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    setTimeout(() => {
      queued = false;
      fn();
    }, ms);
  };
}
