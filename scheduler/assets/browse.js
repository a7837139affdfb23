// The sieve browse page: a project's items as thumbnails, filtered, each
// opening its history, a wrong label reported back to review — from the
// keyboard.
//
// Safety rules this file keeps (as review.js does): data (class names, file
// names, messages) reaches the page only through textContent and DOM
// properties, never as markup to parse (tests/it/browse_page.rs checks
// this); the API token lives in sessionStorage (the review page's key) and
// leaves the page only as an Authorization header; images are fetched with
// that header and shown through blob: URLs.
'use strict';

(function () {
  const API = '/api/v1';
  // The review page's key: signed in there is signed in here.
  const TOKEN_KEY = 'sieve.review.token';
  const PAGE_SIZE = 50;
  // Thumbnails fetched at once.
  const IMAGE_FETCHES = 6;

  const el = (id) => document.getElementById(id);

  const state = {
    token: '',
    project: '',
    started: false,
    projects: [], // from GET /projects: { name, class_names, ... }
    items: [], // the summaries listed so far, in grid order
    cursor: null, // next_cursor of the last page; null: no more
    generation: 0, // bumped by every new listing; older answers are dropped
    loading: false,
    focused: 0, // the grid cell that Tab reaches (roving tabindex)
    open: null, // the item id whose history is shown
    history: null, // its history
    opening: 0, // bumped by every open; older answers are dropped
    reporting: false,
  };

  // Thumbnails by item id: { url, error, promise }; url is a blob: URL.
  const thumbs = new Map();
  const waiting = []; // item ids whose thumbnail is still to fetch
  let fetching = 0;
  let observer = null;

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

  const itemPath = (id, suffix) => '/items/' + encodeURIComponent(id) + suffix;

  // ---- drawing helpers ---------------------------------------------------

  function node(tag, text, className) {
    const n = document.createElement(tag);
    if (text !== undefined && text !== null) n.textContent = text;
    if (className) n.className = className;
    return n;
  }

  const percent = (p) => (typeof p === 'number' ? (100 * p).toFixed(1) + '%' : '');

  function when(iso) {
    if (!iso) return '';
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
  }

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

  // ---- the project and the filters ---------------------------------------

  function currentProject() {
    return state.projects.find((p) => p.name === state.project) || null;
  }

  function fillProjects() {
    const select = el('project-select');
    select.replaceChildren(
      ...state.projects.map((p) => {
        const option = node('option', p.name);
        option.value = p.name;
        return option;
      }),
    );
    select.value = state.project;
  }

  function fillClasses() {
    const project = currentProject();
    const select = el('filter-class');
    const any = node('option', 'any class');
    any.value = '';
    const names = project ? project.class_names : [];
    select.replaceChildren(
      any,
      ...names.map((name) => {
        const option = node('option', name);
        option.value = name;
        return option;
      }),
    );
    select.value = '';
  }

  // The list endpoint's query for the filters as they are set.
  function query(cursor) {
    const params = new URLSearchParams();
    const pairs = [
      ['class', el('filter-class').value],
      ['source', el('filter-source').value],
      ['state', el('filter-state').value],
      ['max_confidence', el('filter-confidence').value.trim()],
    ];
    for (const [name, value] of pairs) if (value) params.set(name, value);
    params.set('limit', String(PAGE_SIZE));
    if (cursor) params.set('cursor', cursor);
    return params.toString();
  }

  function showProjectInUrl() {
    const url = new URL(window.location.href);
    url.searchParams.set('project', state.project);
    window.history.replaceState(null, '', url.pathname + url.search);
    el('review-link').href = '/review?project=' + encodeURIComponent(state.project);
  }

  // ---- the list ----------------------------------------------------------

  // Start the listing afresh (new filters or project): the first page.
  function reload() {
    state.generation += 1;
    state.items = [];
    state.cursor = null;
    state.focused = 0;
    if (observer) observer.disconnect();
    waiting.length = 0;
    forgetThumbs();
    el('grid').replaceChildren();
    renderCount();
    return loadPage(null);
  }

  async function loadPage(cursor) {
    const generation = state.generation;
    state.loading = true;
    renderCount();
    try {
      const page = await json(
        'GET',
        '/projects/' + encodeURIComponent(state.project) + '/items?' + query(cursor),
      );
      if (generation !== state.generation || !state.started) return;
      const first = state.items.length;
      state.items.push(...page.items);
      state.cursor = page.next_cursor || null;
      el('grid').append(...page.items.map((item, i) => cell(item, first + i)));
      say('');
    } catch (err) {
      if (generation !== state.generation) return;
      fail(err);
    } finally {
      if (generation === state.generation) {
        state.loading = false;
        renderCount();
      }
    }
  }

  function loadMore() {
    if (state.loading || !state.cursor) return Promise.resolve();
    return loadPage(state.cursor);
  }

  function renderCount() {
    const count = el('count');
    const n = state.items.length;
    count.dataset.count = String(n);
    count.dataset.loading = String(state.loading);
    if (state.loading && n === 0) count.textContent = 'Loading…';
    else if (n === 0) count.textContent = 'No items match these filters.';
    else count.textContent = n + (n === 1 ? ' item' : ' items') + (state.cursor ? ', more to load' : '');
    el('more').hidden = !state.cursor;
    el('more').disabled = state.loading;
  }

  function describe(item) {
    const parts = [item.source];
    if (item.label) parts.push('labeled ' + item.label + ' by ' + item.label_source);
    else parts.push('no label');
    parts.push(item.state.replace('_', ' '));
    if (typeof item.confidence === 'number') parts.push('model ' + percent(item.confidence) + ' sure');
    return parts.join(', ');
  }

  // One grid cell: a button, so it is focusable and Enter opens it.
  function cell(item, index) {
    const button = node('button', null, 'cell');
    button.type = 'button';
    button.dataset.item = item.item_id;
    button.dataset.index = String(index);
    button.tabIndex = index === state.focused ? 0 : -1;
    button.setAttribute('aria-label', describe(item));
    const image = node('img', null, 'thumb');
    image.alt = '';
    image.decoding = 'async';
    const caption = node('span', null, 'caption');
    caption.append(node('span', item.label === null ? 'unlabeled' : item.label, 'name'));
    if (item.label_source) caption.append(node('span', item.label_source, 'badge source-' + item.label_source));
    const meta = node('span', null, 'meta');
    meta.append(node('span', item.state.replace('_', ' '), 'state'));
    if (typeof item.confidence === 'number') meta.append(node('span', percent(item.confidence), 'confidence'));
    button.append(image, caption, meta);
    if (item.item_id === state.open) button.classList.add('open');
    const li = node('li');
    li.append(button);
    watch(button);
    return li;
  }

  const cells = () => el('grid').querySelectorAll('button.cell');

  function cellOf(id) {
    for (const button of cells()) if (button.dataset.item === id) return button;
    return null;
  }

  function refreshCell(item) {
    const index = state.items.findIndex((i) => i.item_id === item.item_id);
    if (index < 0) return;
    state.items[index] = item;
    const old = cellOf(item.item_id);
    if (!old) return;
    const hadFocus = document.activeElement === old;
    const fresh = cell(item, index);
    old.parentElement.replaceWith(fresh);
    const button = fresh.querySelector('button');
    showThumb(item.item_id);
    if (hadFocus) button.focus();
  }

  // ---- thumbnails, fetched with the token when they come into view --------

  function watch(button) {
    if (!observer) {
      observer = new IntersectionObserver(
        (entries) => {
          for (const entry of entries) {
            if (!entry.isIntersecting) continue;
            observer.unobserve(entry.target);
            want(entry.target.dataset.item);
          }
        },
        { rootMargin: '200px' },
      );
    }
    observer.observe(button);
  }

  function want(id) {
    if (thumbs.has(id)) {
      showThumb(id);
      return;
    }
    if (!waiting.includes(id)) waiting.push(id);
    pump();
  }

  function pump() {
    while (fetching < IMAGE_FETCHES && waiting.length > 0) {
      const id = waiting.shift();
      if (thumbs.has(id)) continue;
      fetching += 1;
      thumb(id).finally(() => {
        fetching -= 1;
        pump();
      });
    }
  }

  // The thumbnail of `id`, fetched once.
  function thumb(id) {
    let entry = thumbs.get(id);
    if (entry) return entry.promise;
    entry = { url: null, error: null, promise: null };
    thumbs.set(id, entry);
    entry.promise = request('GET', API + itemPath(id, '/image'))
      .then((response) => response.blob())
      .then((blob) => {
        if (thumbs.get(id) !== entry) return; // forgotten meanwhile
        entry.url = URL.createObjectURL(blob);
      })
      .catch((err) => {
        entry.error = err.message;
      })
      .then(() => {
        showThumb(id);
        if (state.open === id) renderImage();
      });
    return entry.promise;
  }

  function showThumb(id) {
    const entry = thumbs.get(id);
    const button = cellOf(id);
    if (!entry || !button) return;
    const image = button.querySelector('img.thumb');
    if (entry.url) {
      if (image.src !== entry.url) image.src = entry.url;
      image.classList.remove('broken');
    } else if (entry.error) {
      image.removeAttribute('src');
      image.classList.add('broken');
      image.title = 'The image could not be loaded: ' + entry.error;
    }
  }

  // Free the thumbnails but the open item's.
  function forgetThumbs(all) {
    for (const [id, entry] of thumbs) {
      if (!all && id === state.open) continue;
      if (entry.url) URL.revokeObjectURL(entry.url);
      thumbs.delete(id);
    }
  }

  // ---- moving across the grid --------------------------------------------

  // How many cells a row holds, as laid out now.
  function columns() {
    const all = cells();
    if (all.length === 0) return 1;
    const top = Math.round(all[0].getBoundingClientRect().top);
    let n = 0;
    while (n < all.length && Math.round(all[n].getBoundingClientRect().top) === top) n += 1;
    return Math.max(1, n);
  }

  function focusCell(index) {
    const all = cells();
    if (all.length === 0) return;
    const target = Math.max(0, Math.min(index, all.length - 1));
    for (const button of all) button.tabIndex = -1;
    all[target].tabIndex = 0;
    all[target].focus();
    state.focused = target;
  }

  async function move(key, from) {
    const n = state.items.length;
    const cols = columns();
    let to = from;
    if (key === 'ArrowLeft') to = from - 1;
    else if (key === 'ArrowRight') to = from + 1;
    else if (key === 'ArrowUp') to = from - cols;
    else if (key === 'ArrowDown') to = from + cols;
    else if (key === 'Home') to = 0;
    else if (key === 'End') to = n - 1;
    if (to < 0) return;
    if (to >= n) {
      // Past the end: the next page, if there is one.
      if (state.cursor && (key === 'ArrowRight' || key === 'ArrowDown')) {
        await loadMore();
        if (to >= state.items.length) to = state.items.length - 1;
      } else if (key === 'ArrowDown' && Math.floor((n - 1) / cols) > Math.floor(from / cols)) {
        to = n - 1; // a shorter last row
      } else {
        return;
      }
    }
    focusCell(to);
  }

  // ---- an item's history -------------------------------------------------

  async function open(id) {
    const opening = ++state.opening;
    if (state.open !== id) {
      el('report-result').textContent = '';
      closeReport();
      clearHistory();
    }
    state.open = id;
    for (const button of cells()) button.classList.toggle('open', button.dataset.item === id);
    el('details').hidden = false;
    el('layout').classList.add('with-details');
    want(id);
    try {
      const history = await json('GET', itemPath(id, ''));
      if (opening !== state.opening || state.open !== id) return;
      state.history = history;
      renderHistory();
      say('The history of ' + history.source + '.');
    } catch (err) {
      if (opening !== state.opening) return;
      fail(err);
    }
  }

  function close() {
    const id = state.open;
    state.open = null;
    state.history = null;
    state.opening += 1;
    closeReport();
    el('details').hidden = true;
    el('layout').classList.remove('with-details');
    el('report-result').textContent = '';
    for (const button of cells()) button.classList.remove('open');
    const button = id && cellOf(id);
    if (button) focusCell(Number(button.dataset.index));
  }

  // Nothing of another item's history on screen while this one loads.
  function clearHistory() {
    state.history = null;
    el('details-title').textContent = 'Loading…';
    for (const id of ['summary', 'predictions', 'labels', 'tasks']) el(id).replaceChildren();
    el('report-open').disabled = true;
  }

  function renderImage() {
    const history = state.history;
    const image = el('details-image');
    const entry = state.open && thumbs.get(state.open);
    if (entry && entry.url) {
      if (image.src !== entry.url) image.src = entry.url;
      image.alt = history ? history.source : '';
      image.hidden = false;
      el('details-image-error').textContent = '';
    } else {
      image.removeAttribute('src');
      image.hidden = true;
      el('details-image-error').textContent =
        entry && entry.error ? 'The image could not be loaded: ' + entry.error : '';
    }
  }

  function term(list, name, value) {
    if (value === null || value === undefined || value === '') return;
    list.append(node('dt', name), node('dd', value));
  }

  function labelText(label) {
    let text = (label.class !== null ? label.class : '#' + label.class_index) + ' — ' + label.source;
    if (label.labeled_by) text += ' by ' + label.labeled_by;
    if (label.model_version !== null && label.model_version !== undefined) text += ' (model v' + label.model_version + ')';
    return text;
  }

  function renderHistory() {
    const h = state.history;
    if (!h) return;
    el('details-title').textContent = h.source;
    renderImage();

    const summary = el('summary');
    summary.replaceChildren();
    term(summary, 'State', h.state.replace('_', ' '));
    term(summary, 'Label', h.label ? labelText(h.label) : 'none yet');
    term(summary, 'Size', (h.width && h.height ? h.width + '×' + h.height + ', ' : '') + h.size_bytes + ' bytes');
    term(summary, 'Added', when(h.created_at));
    term(summary, 'Last error', h.last_error);
    term(summary, 'Item', h.item_id);

    const predictions = h.predictions.map((p) => {
      const li = node('li');
      const version = p.model_version !== null && p.model_version !== undefined ? 'model v' + p.model_version : 'an unknown model';
      li.append(
        node('span', version + ': ', 'what'),
        node('span', p.predicted !== null ? p.predicted : '#' + p.top_class, 'name'),
        node('span', ' ' + percent(p.confidence) + ' sure' + (p.routed_to ? ', routed to ' + p.routed_to.replace('_', ' ') : '')),
        node('span', ' · ' + when(p.created_at), 'when'),
      );
      return li;
    });
    el('predictions').replaceChildren(...(predictions.length ? predictions : [node('li', 'none', 'none')]));

    const current = h.label ? h.label.label_id : null;
    const labels = h.labels.map((l) => {
      const li = node('li');
      li.dataset.source = l.source;
      li.append(
        node('span', l.class !== null ? l.class : '#' + l.class_index, 'name'),
        node('span', ' — ' + l.source + (l.labeled_by ? ' by ' + l.labeled_by : '') +
          (l.model_version !== null && l.model_version !== undefined ? ' (model v' + l.model_version + ')' : '')),
        node('span', ' · ' + when(l.created_at), 'when'),
      );
      if (l.label_id === current) {
        li.classList.add('current');
        li.append(node('span', ' (current)', 'tag'));
      }
      return li;
    });
    el('labels').replaceChildren(...(labels.length ? labels : [node('li', 'none', 'none')]));

    const tasks = h.review_tasks.map((t) => {
      const li = node('li');
      li.dataset.reason = t.reason;
      let text = t.reason.replace('_', ' ') + ': ' + (t.outcome ? t.outcome : t.state === 'claimed' ? 'held by ' + (t.lease_holder || 'someone') : 'open');
      if (t.skip_count > 0) text += ', skipped ' + t.skip_count + '×' + (t.last_skip_reason ? ' (' + t.last_skip_reason + ')' : '');
      li.append(node('span', text));
      if (t.report_reason !== null && t.report_reason !== undefined) {
        li.append(node('span', ' — reported by ' + (t.reported_by || 'someone') + ': ', 'what'), node('q', t.report_reason));
      }
      li.append(node('span', ' · ' + when(t.created_at), 'when'));
      return li;
    });
    el('tasks').replaceChildren(...(tasks.length ? tasks : [node('li', 'none', 'none')]));

    const button = el('report-open');
    button.disabled = !h.label;
    button.title = h.label ? '' : 'No label yet: nothing to report.';
    el('report-force-label').hidden = !(h.label && h.label.source === 'human');
  }

  // ---- reporting a label as wrong ----------------------------------------

  async function openReport(id) {
    if (!id) return;
    if (state.open !== id || !state.history) await open(id);
    if (state.open !== id || !state.history) return;
    if (!state.history.label) {
      showResult('Nothing to report: this item has no label yet.', true);
      return;
    }
    el('report-form').hidden = false;
    el('report-force').checked = false;
    const input = el('report-reason');
    input.value = '';
    input.focus();
  }

  function closeReport() {
    const form = el('report-form');
    const hadFocus = form.contains(document.activeElement);
    form.hidden = true;
    if (!hadFocus) return;
    const button = state.open && cellOf(state.open);
    if (button) focusCell(Number(button.dataset.index));
    else document.activeElement.blur();
  }

  function showResult(message, isError) {
    const result = el('report-result');
    result.textContent = message;
    result.classList.toggle('error', Boolean(isError));
  }

  async function sendReport() {
    const id = state.open;
    if (!id || state.reporting) return;
    const reason = el('report-reason').value.trim();
    if (!reason) {
      showResult('Say what looks wrong first.', true);
      return;
    }
    state.reporting = true;
    el('report-send').disabled = true;
    try {
      const reopened = await json('POST', itemPath(id, '/reopen'), {
        reason,
        force: el('report-force').checked,
      });
      closeReport();
      showResult(
        'Sent back to review: the ' + reopened.reported_source + ' label ' + reopened.reported_class +
          ' is first in the review queue.',
        false,
      );
      say('Reported ' + (state.history ? state.history.source : id) + '.');
      await open(id);
      const item = state.items.find((i) => i.item_id === id);
      if (item && state.history) refreshCell(Object.assign({}, item, { state: state.history.state }));
    } catch (err) {
      if (err.status === 401) fail(err);
      else showResult('Not reported: ' + err.message, true);
    } finally {
      state.reporting = false;
      el('report-send').disabled = false;
    }
  }

  // ---- starting, stopping, keys ------------------------------------------

  async function start(event) {
    if (event) event.preventDefault();
    const token = el('token').value.trim();
    const project = el('project').value.trim();
    if (!token || !project) {
      say('A token and a project are needed.', true);
      return;
    }
    state.token = token;
    state.project = project;
    sessionStorage.setItem(TOKEN_KEY, token);
    el('token').value = '';
    say('Loading…');
    let projects;
    try {
      projects = await json('GET', '/projects');
    } catch (err) {
      fail(err);
      if (err.status !== 401) signOut(false);
      return;
    }
    state.projects = (Array.isArray(projects) ? projects : []).sort((a, b) => a.name.localeCompare(b.name));
    if (!currentProject()) {
      signOut(false);
      say('There is no project ' + project + ' that this token may see.', true);
      return;
    }
    state.started = true;
    showProjectInUrl();
    fillProjects();
    fillClasses();
    render();
    if (document.activeElement) document.activeElement.blur();
    await reload();
  }

  function signOut(forgetToken) {
    state.generation += 1;
    state.started = false;
    state.items = [];
    state.cursor = null;
    if (state.open) close();
    if (observer) observer.disconnect();
    waiting.length = 0;
    forgetThumbs(true);
    el('grid').replaceChildren();
    if (forgetToken) sessionStorage.removeItem(TOKEN_KEY);
    el('project').value = state.project;
    render();
  }

  function render() {
    el('login').hidden = state.started;
    el('browse').hidden = !state.started;
    el('sign-out').hidden = !state.started;
    el('project-name').textContent = state.started ? state.project : '';
  }

  function changeProject() {
    const name = el('project-select').value;
    if (!name || name === state.project) return;
    if (state.open) close();
    state.project = name;
    showProjectInUrl();
    fillClasses();
    render();
    reload();
  }

  function clearFilters() {
    el('filter-class').value = '';
    el('filter-source').value = '';
    el('filter-state').value = '';
    el('filter-confidence').value = '';
    reload();
  }

  const ARROWS = ['ArrowLeft', 'ArrowRight', 'ArrowUp', 'ArrowDown', 'Home', 'End'];

  function onKey(event) {
    if (!state.started || event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    const target = event.target;
    if (target === el('report-reason')) {
      if (event.key === 'Escape') {
        event.preventDefault();
        closeReport();
      }
      return;
    }
    // Typing or choosing in a field is not a command.
    if (
      target instanceof HTMLInputElement ||
      target instanceof HTMLSelectElement ||
      target instanceof HTMLTextAreaElement
    ) {
      return;
    }
    const button = target instanceof Element ? target.closest('button.cell') : null;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (ARROWS.includes(key)) {
      if (button) {
        event.preventDefault();
        move(key, Number(button.dataset.index));
      } else if (target === document.body || el('details').contains(target)) {
        event.preventDefault();
        focusCell(state.focused);
      }
    } else if (key === 'Enter' && button) {
      // Also keeps the button from being clicked a second time.
      event.preventDefault();
      open(button.dataset.item);
    } else if (key === 'Escape' && state.open) {
      event.preventDefault();
      if (!el('report-form').hidden) closeReport();
      else close();
    } else if (key === 'r') {
      const id = button ? button.dataset.item : state.open;
      if (!id) return;
      event.preventDefault();
      openReport(id);
    }
  }

  function init() {
    el('login-form').addEventListener('submit', start);
    el('sign-out').addEventListener('click', () => signOut(true));
    el('filters').addEventListener('submit', (event) => {
      event.preventDefault();
      reload();
    });
    for (const id of ['filter-class', 'filter-source', 'filter-state', 'filter-confidence']) {
      el(id).addEventListener('change', () => reload());
    }
    el('project-select').addEventListener('change', changeProject);
    el('reset').addEventListener('click', clearFilters);
    el('more').addEventListener('click', () => loadMore());
    el('grid').addEventListener('click', (event) => {
      const button = event.target.closest('button.cell');
      if (!button) return;
      focusCell(Number(button.dataset.index));
      open(button.dataset.item);
    });
    el('grid').addEventListener('focusin', (event) => {
      const button = event.target.closest('button.cell');
      if (button) state.focused = Number(button.dataset.index);
    });
    el('close').addEventListener('click', close);
    el('report-open').addEventListener('click', () => openReport(state.open));
    el('report-form').addEventListener('submit', (event) => {
      event.preventDefault();
      sendReport();
    });
    document.addEventListener('keydown', onKey);

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
