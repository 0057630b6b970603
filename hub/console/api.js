// api.js: the console's calls to the admin API, signed in by the session cookie (sent by
// the browser, unreadable to scripts), with the session's CSRF token on every change, and
// the live event stream with automatic reconnection.

let csrf = null;
let onSignedOut = () => {};

/** A refusal or failure from the API, with its status and the API's message. */
export class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Sets what happens when the API says the session is gone. */
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

/** Whether this browser has a session (and fetches its CSRF token). */
export async function checkSession() {
  const resp = await fetch('/console/session', { credentials: 'same-origin' });
  if (!resp.ok) return false;
  csrf = (await resp.json()).csrf;
  return true;
}

/** Signs in with the admin token. */
export async function signIn(token) {
  const resp = await fetch('/console/login', {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ token }),
  });
  if (!resp.ok) throw await failure(resp);
  return checkSession();
}

/** Ends the session. */
export async function signOut() {
  await fetch('/console/logout', {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'X-CSRF-Token': csrf ?? '' },
  });
  csrf = null;
}

async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    message = (await resp.json()).error?.message ?? message;
  } catch {
    // Not the API's JSON: the status says enough.
  }
  return new ApiFailure(resp.status, message);
}

/** Calls the API: GET without a body, otherwise the method with a JSON body. */
export async function api(path, { method = 'GET', body, signal } = {}) {
  const headers = {};
  if (method !== 'GET') headers['X-CSRF-Token'] = csrf ?? '';
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, {
    method,
    headers,
    signal,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401) onSignedOut();
  if (!resp.ok) throw await failure(resp);
  const type = resp.headers.get('Content-Type') ?? '';
  return type.startsWith('application/json') ? resp.json() : resp.text();
}

/**
 * Makes `button` POST to `path` when clicked: a refusal's message goes into `error` (and
 * a success clears it), then `reload()` shows the new state either way.
 */
export function onAction(button, path, error, reload) {
  button.addEventListener('click', async () => {
    try {
      await api(path, { method: 'POST', body: {} });
      error.textContent = '';
    } catch (err) {
      error.textContent = String(err.message ?? err);
    }
    await reload().catch(() => {});
  });
}

/**
 * Follows the hub's event stream (`/api/v1/events`) until `close()`. The browser's
 * EventSource reconnects by itself and resumes with `Last-Event-ID`; when the hub refuses
 * or is gone long enough for the EventSource to give up, a new one is opened after a
 * pause, resuming from the last id seen (`last_event_id`). `handlers` maps event names
 * (presence, command, state, readings, lagged) to callbacks taking the parsed data;
 * `status(live)` reports whether the stream is connected.
 */
export function follow(params, handlers, status = () => {}) {
  let source = null;
  let lastId = params.last_event_id ?? null;
  let closed = false;
  let retry = 500;
  let timer = null;
  const open = () => {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (k !== 'last_event_id' && v) query.set(k, v);
    if (lastId) query.set('last_event_id', lastId);
    source = new EventSource(`/api/v1/events?${query}`, { withCredentials: true });
    source.onopen = () => {
      retry = 500;
      status(true);
    };
    source.onerror = () => {
      status(false);
      if (source.readyState === EventSource.CLOSED && !closed) {
        // The hub refused the stream: a session that ended is the usual reason.
        source = null;
        timer = setTimeout(async () => {
          const signedIn = await checkSession().catch(() => true);
          if (closed) return;
          if (signedIn) open();
          else onSignedOut();
        }, retry);
        retry = Math.min(retry * 2, 10000);
      }
    };
    for (const [name, handle] of Object.entries(handlers)) {
      source.addEventListener(name, (ev) => {
        if (ev.lastEventId) lastId = ev.lastEventId;
        handle(JSON.parse(ev.data));
      });
    }
    // The first event of a stream carries only an id: the position to resume from.
    source.addEventListener('message', (ev) => {
      if (ev.lastEventId) lastId = ev.lastEventId;
    });
  };
  open();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      source?.close();
    },
    lastId: () => lastId,
  };
}
