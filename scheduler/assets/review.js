// The sieve review page: claim, look, label, next — from the keyboard.
//
// Safety rules this file keeps: data (class names, file names, messages)
// reaches the page only through textContent and DOM properties, never as
// markup to parse (tests/review_page.rs checks this); the API token lives in sessionStorage and leaves the page only
// as an Authorization header; images are fetched with that header and shown
// through blob: URLs.
'use strict';

(function () {
  const API = '/api/v1';
  const TOKEN_KEY = 'sieve.review.token';
  // Keys that pick a class, in class order (s and u are skip and undo).
  const CLASS_KEYS = '1234567890abcdefghijklmnopqrtvwxyz'.split('');
  const TOP_K = 5;
  const REASONS = {
    low_confidence: 'The model is not sure.',
    disagreement: 'The committee disagrees.',
    audit: 'Audit: a sample of what the model would label by itself.',
    seed: 'Seed: labels to start the model with.',
    second_opinion: 'Second opinion: another reviewer disagreed with a confident model. Label it as you see it.',
  };

  const el = (id) => document.getElementById(id);

  const state = {
    token: '',
    project: '',
    started: false,
    // Each entry: { task, imageUrl, imageError }; imageUrl is a blob: URL.
    current: null,
    next: null, // the preloaded claim
    nextLoading: null, // the preload in flight (a Promise)
    last: null, // the last submit: { entry, undoUntil, className }
    picked: null, // class index picked with a key or a click
    remaining: null,
    busy: false,
    renewTimer: null,
  };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // One request to the scheduler with the token; a non-2xx answer becomes
  // an ApiError carrying the server's message.
  async function request(method, path, body) {
    const headers = { Authorization: 'Bearer ' + state.token };
    const init = { method, headers, cache: 'no-store', credentials: 'omit' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, 'cannot reach the scheduler (' + err.message + ')');
    }
    if (!response.ok) {
      let message = response.status + ' ' + response.statusText;
      try {
        const data = await response.json();
        if (data && data.error && data.error.message) message = data.error.message;
      } catch (_) {
        // not a JSON error body: keep the status line
      }
      throw new ApiError(response.status, message);
    }
    return response;
  }

  async function json(method, path, body) {
    const response = await request(method, API + path, body);
    return response.status === 204 ? null : response.json();
  }

  const projectPath = (suffix) => '/projects/' + encodeURIComponent(state.project) + suffix;
  const taskPath = (task, suffix) => '/review/' + encodeURIComponent(task.task_id) + suffix;

  // ---- claims ------------------------------------------------------------

  async function claim() {
    const task = await json('POST', projectPath('/review/next'));
    if (task === null) return null;
    state.remaining = task.remaining;
    const entry = { task, imageUrl: null, imageError: null };
    await loadImage(entry);
    return entry;
  }

  async function loadImage(entry) {
    const url = entry.task.image_url || API + '/items/' + encodeURIComponent(entry.task.item_id) + '/image';
    try {
      const response = await request('GET', url);
      entry.imageUrl = URL.createObjectURL(await response.blob());
    } catch (err) {
      entry.imageError = err.message;
    }
  }

  // Free an entry's image unless something still shows or may show it.
  function forget(entry) {
    if (!entry || !entry.imageUrl) return;
    const kept = [state.current, state.next, state.last && state.last.entry];
    if (kept.includes(entry)) return;
    URL.revokeObjectURL(entry.imageUrl);
    entry.imageUrl = null;
  }

  async function release(entry) {
    try {
      await json('POST', taskPath(entry.task, '/release'), { fencing_token: entry.task.fencing_token });
    } catch (_) {
      // The lease runs out by itself.
    }
    forget(entry);
  }

  function preload() {
    if (!state.started || !state.current || state.next || state.nextLoading) return;
    const loading = claim().then(
      (entry) => {
        if (state.nextLoading !== loading) {
          if (entry) release(entry); // superseded (signed out meanwhile)
          return null;
        }
        state.nextLoading = null;
        state.next = entry;
        render();
        return entry;
      },
      (err) => {
        if (state.nextLoading === loading) state.nextLoading = null;
        fail(err);
        return null;
      },
    );
    state.nextLoading = loading;
  }

  async function takeNext() {
    if (state.nextLoading) await state.nextLoading;
    const entry = state.next;
    state.next = null;
    return entry || claim();
  }

  // Show the next task (the preloaded one when there is one), then preload.
  async function advance() {
    let entry = null;
    try {
      entry = await takeNext();
    } catch (err) {
      fail(err);
      // No such project, or a token that may not review: back to the start.
      if (err.status === 403 || err.status === 404) {
        signOut(false);
        say(err.message, true);
      }
    }
    if (!state.started) {
      if (entry) release(entry); // signed out while it loaded
      return;
    }
    state.current = entry;
    state.picked = null;
    render();
    preload();
  }

  // ---- the reviewer's actions --------------------------------------------

  function proposedIndex(task) {
    if (task.predicted_class === null || task.predicted_class === undefined) return null;
    const index = task.class_names.indexOf(task.predicted_class);
    return index >= 0 ? index : null;
  }

  function accept() {
    const entry = state.current;
    if (!entry) return;
    const index = state.picked !== null ? state.picked : proposedIndex(entry.task);
    if (index === null) {
      say('There is no pre-label: pick a class with its key first.', true);
      return;
    }
    submit(entry, index);
  }

  async function submit(entry, index) {
    if (state.busy) return;
    state.busy = true;
    const className = entry.task.class_names[index];
    try {
      const label = await json('POST', taskPath(entry.task, '/submit'), {
        fencing_token: entry.task.fencing_token,
        class: className,
      });
      const previous = state.last;
      state.last = {
        entry,
        undoUntil: label.undo_until ? Date.parse(label.undo_until) : null,
        className: label.class,
      };
      state.current = null;
      if (previous) forget(previous.entry);
      say('Labeled ' + entry.task.source + ' as ' + label.class + '.' + (state.last.undoUntil ? ' U undoes it.' : ''));
      await advance();
    } catch (err) {
      await lost(entry, err);
    } finally {
      state.busy = false;
      render();
    }
  }

  // A step on the current task was refused: when the claim is gone (409,
  // 404), say so and move on; otherwise stay.
  async function lost(entry, err) {
    if ((err.status === 409 || err.status === 404) && state.current === entry) {
      say(err.message + ' — moving on.', true);
      state.current = null;
      forget(entry);
      await advance();
    } else {
      fail(err);
    }
  }

  function openSkip() {
    if (!state.current || state.busy) return;
    el('skip-form').hidden = false;
    const input = el('skip-reason');
    input.value = 'not sure';
    input.focus();
    input.select();
  }

  function closeSkip() {
    el('skip-form').hidden = true;
    el('skip-reason').blur();
  }

  async function skip(reason) {
    const entry = state.current;
    if (!entry || state.busy) return;
    state.busy = true;
    try {
      const skipped = await json('POST', taskPath(entry.task, '/skip'), {
        fencing_token: entry.task.fencing_token,
        reason,
      });
      closeSkip();
      state.current = null;
      forget(entry);
      state.remaining = skipped.remaining;
      say('Skipped ' + entry.task.source + ': it goes to the end of the queue.');
      await advance();
    } catch (err) {
      if (err.status === 422) fail(err);
      else {
        closeSkip();
        await lost(entry, err);
      }
    } finally {
      state.busy = false;
      render();
    }
  }

  async function undo() {
    const last = state.last;
    if (state.busy) return;
    if (!last) {
      say('There is no submit to undo.', true);
      return;
    }
    if (last.undoUntil === null) {
      say('That submit was made after its lease ran out: it cannot be undone here.', true);
      return;
    }
    state.busy = true;
    try {
      const task = await json('POST', taskPath(last.entry.task, '/undo'), {
        fencing_token: last.entry.task.fencing_token,
      });
      state.last = null;
      const reopened = { task, imageUrl: last.entry.imageUrl, imageError: last.entry.imageError };
      // The task on screen becomes the next one again; a preloaded one goes
      // back to the queue.
      if (state.nextLoading) await state.nextLoading;
      const spare = state.next;
      state.next = state.current;
      state.current = reopened;
      state.picked = null;
      state.remaining = task.remaining;
      if (spare) await release(spare);
      say('Undone: ' + task.source + ' is back; its label was removed.');
    } catch (err) {
      if (err.status === 409 || err.status === 403 || err.status === 404) state.last = null;
      fail(err);
    } finally {
      state.busy = false;
      render();
    }
  }

  // ---- the lease ---------------------------------------------------------

  function renewEvery() {
    const held = state.current || state.next;
    const seconds = (held && held.task.lease_seconds) || 300;
    return Math.min(60, Math.max(2, seconds / 3)) * 1000;
  }

  function startRenewing() {
    clearTimeout(state.renewTimer);
    const tick = async () => {
      await renewAll();
      if (state.started) state.renewTimer = setTimeout(tick, renewEvery());
    };
    state.renewTimer = setTimeout(tick, renewEvery());
  }

  async function renewAll() {
    for (const slot of ['current', 'next']) {
      const entry = state[slot];
      // A submit or skip in flight decides this task's fate itself.
      if (!entry || state.busy) continue;
      try {
        const lease = await json('POST', taskPath(entry.task, '/renew'), {
          fencing_token: entry.task.fencing_token,
        });
        entry.task.lease_expires_at = lease.lease_expires_at;
      } catch (err) {
        if (state[slot] !== entry || state.busy) continue;
        if (err.status === 409 || err.status === 404) {
          if (slot === 'current') await lost(entry, err);
          else {
            state.next = null;
            forget(entry);
            preload();
          }
        } else {
          fail(err);
        }
      }
    }
  }

  // ---- drawing -----------------------------------------------------------

  function node(tag, text, className) {
    const n = document.createElement(tag);
    if (text !== undefined && text !== null) n.textContent = text;
    if (className) n.className = className;
    return n;
  }

  const percent = (p) => (100 * p).toFixed(1) + '%';

  function say(message, isError) {
    const status = el('status');
    status.textContent = message;
    status.classList.toggle('error', Boolean(isError));
  }

  function fail(err) {
    if (err.status === 401) {
      say('The scheduler refused the token: ' + err.message, true);
      signOut(true);
      return;
    }
    say(err.message, true);
  }

  function renderRemaining() {
    const counter = el('remaining');
    if (!state.started || state.remaining === null) {
      counter.textContent = '';
      return;
    }
    const held = (state.current ? 1 : 0) + (state.next ? 1 : 0);
    const left = state.remaining + held;
    counter.dataset.left = String(left);
    counter.textContent = left + ' left';
  }

  function render() {
    el('login').hidden = state.started;
    el('review').hidden = !state.started;
    el('sign-out').hidden = !state.started;
    el('project-name').textContent = state.started ? state.project : '';
    renderRemaining();
    const entry = state.current;
    el('task').hidden = !entry;
    el('empty').hidden = Boolean(entry) || !state.started;
    el('undo').disabled = !state.last;
    el('undo-empty').disabled = !state.last;
    if (!entry) return;
    const task = entry.task;

    const image = el('image');
    if (entry.imageUrl) {
      if (image.src !== entry.imageUrl) image.src = entry.imageUrl;
      image.alt = task.source;
      image.hidden = false;
      el('image-error').textContent = '';
    } else {
      image.removeAttribute('src');
      image.hidden = true;
      el('image-error').textContent = 'The image could not be loaded: ' + (entry.imageError || 'unknown error');
    }
    el('source').textContent = task.source;
    el('reason').textContent = REASONS[task.reason] || task.reason;

    const proposed = proposedIndex(task);
    el('prelabel').textContent =
      proposed === null
        ? 'No pre-label yet: pick a class.'
        : 'Pre-label: ' + task.class_names[proposed] +
          (typeof task.confidence === 'number' ? ' (' + percent(task.confidence) + ')' : '');

    const probabilities = Array.isArray(task.probabilities) ? task.probabilities : [];
    const ranked = probabilities
      .map((p, i) => [i, p])
      .filter(([i]) => i < task.class_names.length)
      .sort((a, b) => b[1] - a[1])
      .slice(0, TOP_K);
    el('topk').replaceChildren(
      ...ranked.map(([i, p]) => {
        const item = node('li');
        const meter = node('meter');
        meter.min = 0;
        meter.max = 1;
        meter.value = p;
        item.append(node('span', task.class_names[i], 'name'), meter, node('span', percent(p)));
        return item;
      }),
    );

    const votes = Array.isArray(task.member_votes) ? task.member_votes : [];
    if (votes.length > 0) {
      const counts = new Map();
      for (const v of votes) counts.set(v, (counts.get(v) || 0) + 1);
      const parts = [...counts.entries()]
        .sort((a, b) => b[1] - a[1])
        .map(([c, n]) => n + ' × ' + (task.class_names[c] !== undefined ? task.class_names[c] : '#' + c));
      el('votes').textContent = 'Committee of ' + votes.length + ': ' + parts.join(', ');
    } else {
      el('votes').textContent = '';
    }

    el('classes').replaceChildren(
      ...task.class_names.map((name, i) => {
        const button = node('button');
        button.type = 'button';
        button.dataset.index = String(i);
        if (i === state.picked) button.classList.add('picked');
        if (i === proposed) button.classList.add('proposed');
        button.append(node('span', CLASS_KEYS[i] ? CLASS_KEYS[i].toUpperCase() : '·', 'key'), node('span', name, 'name'));
        const item = node('li');
        item.append(button);
        return item;
      }),
    );

    const chosen = state.picked !== null ? state.picked : proposed;
    const accept = el('accept');
    accept.replaceChildren(node('kbd', 'Enter'), document.createTextNode(
      chosen === null ? ' pick a class first' : ' label as ' + task.class_names[chosen],
    ));
    accept.disabled = chosen === null || state.busy;
  }

  // ---- starting, stopping, keys ------------------------------------------

  function start(event) {
    if (event) event.preventDefault();
    const token = el('token').value.trim();
    const project = el('project').value.trim();
    if (!token || !project) {
      say('A token and a project are needed.', true);
      return;
    }
    state.token = token;
    state.project = project;
    state.started = true;
    sessionStorage.setItem(TOKEN_KEY, token);
    el('token').value = '';
    const url = new URL(window.location.href);
    url.searchParams.set('project', project);
    window.history.replaceState(null, '', url.pathname + url.search);
    if (document.activeElement) document.activeElement.blur();
    say('');
    render();
    advance().then(startRenewing);
  }

  function signOut(forgetToken) {
    clearTimeout(state.renewTimer);
    for (const entry of [state.current, state.next]) if (entry) release(entry);
    // A preload still in flight releases its claim when it lands.
    state.nextLoading = null;
    state.started = false;
    state.current = null;
    state.next = null;
    if (state.last) {
      const entry = state.last.entry;
      state.last = null;
      forget(entry);
    }
    if (forgetToken) sessionStorage.removeItem(TOKEN_KEY);
    el('project').value = state.project;
    render();
  }

  function onKey(event) {
    if (!state.started || event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    const target = event.target;
    // Typing in a field (the skip reason) is not a command.
    if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (key === 'u') {
      event.preventDefault();
      undo();
      return;
    }
    const entry = state.current;
    if (!entry || state.busy) return;
    if (key === 'Enter') {
      // Also keeps a focused button from being clicked a second time.
      event.preventDefault();
      accept();
    } else if (key === 's') {
      event.preventDefault();
      openSkip();
    } else if (key === 'Escape') {
      state.picked = null;
      render();
    } else {
      const index = CLASS_KEYS.indexOf(key);
      if (index >= 0 && index < entry.task.class_names.length) {
        event.preventDefault();
        state.picked = index;
        render();
      }
    }
  }

  function init() {
    el('login-form').addEventListener('submit', start);
    el('sign-out').addEventListener('click', () => signOut(true));
    el('check-again').addEventListener('click', () => advance());
    el('accept').addEventListener('click', accept);
    el('skip').addEventListener('click', openSkip);
    el('undo').addEventListener('click', undo);
    el('undo-empty').addEventListener('click', undo);
    el('classes').addEventListener('click', (event) => {
      const button = event.target.closest('button[data-index]');
      if (!button || !state.current) return;
      state.picked = Number(button.dataset.index);
      button.blur();
      render();
    });
    el('skip-form').addEventListener('submit', (event) => {
      event.preventDefault();
      skip(el('skip-reason').value);
    });
    el('skip-reason').addEventListener('keydown', (event) => {
      if (event.key === 'Escape') {
        event.preventDefault();
        closeSkip();
      }
    });
    document.addEventListener('keydown', onKey);
    // Give held tasks back when the page goes away; keepalive lets the
    // request outlive the page.
    window.addEventListener('pagehide', () => {
      for (const entry of [state.current, state.next]) {
        if (!entry) continue;
        fetch(API + taskPath(entry.task, '/release'), {
          method: 'POST',
          keepalive: true,
          credentials: 'omit',
          headers: { Authorization: 'Bearer ' + state.token, 'Content-Type': 'application/json' },
          body: JSON.stringify({ fencing_token: entry.task.fencing_token }),
        }).catch(() => {});
      }
    });

    const params = new URLSearchParams(window.location.search);
    el('project').value = params.get('project') || '';
    const saved = sessionStorage.getItem(TOKEN_KEY) || '';
    el('token').value = saved;
    render();
    if (saved && el('project').value) start();
    else (el('project').value ? el('token') : el('project')).focus();
  }

  init();
})();
