// app.js: the console's entry point: sign-in and sign-out, the hash router (#/,
// #/devices, #/device/ID, #/jobs, #/job/ID, #/rollouts, #/rollout/ID), and the live
// indicator. Each page is a module whose `show` draws into <main> and returns a function
// that stops its timers and streams.

import { checkSession, signIn, signOut, whenSignedOut, ApiFailure } from './api.js';
import { replace, route, el } from './dom.js';
import * as overview from './overview.js';
import * as devices from './devices.js';
import * as device from './device.js';
import * as jobs from './jobs.js';
import * as job from './job.js';
import * as rollouts from './rollouts.js';
import * as rollout from './rollout.js';

const pages = { overview, devices, device, jobs, job, rollouts, rollout };
/** The navigation entry each page belongs to. */
const section = { device: 'devices', job: 'jobs', rollout: 'rollouts' };
const main = document.getElementById('main');
const top = document.getElementById('top');
const signInSection = document.getElementById('sign-in');
const live = document.getElementById('live');
let stopPage = () => {};

/** Shows whether the page's event stream is connected. */
export function setLive(connected) {
  live.textContent = connected ? 'live' : 'reconnecting';
  live.className = connected ? 'live on' : 'live off';
}

function showSignIn(message = '') {
  stopPage();
  stopPage = () => {};
  top.hidden = true;
  replace(main);
  signInSection.hidden = false;
  document.getElementById('sign-in-error').textContent = message;
  document.getElementById('token').focus();
}

async function render() {
  stopPage();
  stopPage = () => {};
  const [name, arg, query] = route();
  const page = pages[name] ?? overview;
  for (const link of document.querySelectorAll('header nav a')) {
    link.classList.toggle('current', link.id === `nav-${section[name] ?? name}`);
  }
  replace(main);
  try {
    stopPage = (await page.show(main, arg, query, { setLive })) ?? (() => {});
  } catch (err) {
    if (err instanceof ApiFailure && err.status === 401) return;
    replace(main, el('p', { class: 'error' }, String(err.message ?? err)));
  }
}

async function start() {
  whenSignedOut(() => showSignIn('Your session has ended; sign in again.'));
  if (!(await checkSession())) {
    showSignIn(location.hash === '#link-expired' ? 'That sign-in link was used or has expired; run `hub console` for a new one.' : '');
    return;
  }
  signInSection.hidden = true;
  top.hidden = false;
  if (location.hash === '#link-expired') location.hash = '#/';
  await render();
}

document.getElementById('sign-in-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const input = document.getElementById('token');
  try {
    await signIn(input.value.trim());
    input.value = '';
    await start();
  } catch (err) {
    document.getElementById('sign-in-error').textContent = String(err.message ?? err);
  }
});

document.getElementById('sign-out').addEventListener('click', async () => {
  await signOut();
  showSignIn('Signed out.');
});

window.addEventListener('hashchange', () => {
  if (!top.hidden) render();
});

start();
