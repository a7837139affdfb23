// The sieve review page: claim, look, label, next — from the keyboard.
//
// Safety rules this file keeps: data (class names, file names, messages)
// reaches the page only through textContent and DOM properties, never as
// markup to parse (tests/review_page.rs checks this); the API token lives in sessionStorage and leaves the page only
// as an Authorization header; images are fetched with that header and shown
// through blob: URLs.
//
// A detection project's task is labeled with boxes: the image is shown on a
// board sized by the zoom, under an SVG whose viewBox is the image's own
// pixels, so a box is kept, drawn and sent in pixels of the original image
// whatever its size on screen.
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
  const SVG = 'http://www.w3.org/2000/svg';
  // Screen pixels a press must travel before it is a drag, not a click.
  const DRAG_THRESHOLD = 3;
  // Screen sizes of what is drawn over the image: corner handles, labels.
  const HANDLE = 10;
  const TAG = 13;
  // Zoom, relative to the image fitted to the page.
  const ZOOM_STEP = 1.25;
  const ZOOM_MIN = 0.5;
  const ZOOM_MAX = 16;
  const ARROWS = {
    ArrowLeft: [-1, 0],
    ArrowRight: [1, 0],
    ArrowUp: [0, -1],
    ArrowDown: [0, 1],
  };

  const el = (id) => document.getElementById(id);

  const state = {
    token: '',
    project: '',
    started: false,
    // Each entry: { task, imageUrl, imageError, boxes }; imageUrl is a blob:
    // URL; boxes (detection) the reviewer's boxes, each { class (an index),
    // x_min, y_min, x_max, y_max } in pixels of the original image.
    current: null,
    next: null, // the preloaded claim
    nextLoading: null, // the preload in flight (a Promise)
    last: null, // the last submit: { entry, undoUntil, className }
    picked: null, // class index picked with a key or a click
    remaining: null,
    busy: false,
    renewTimer: null,
    // Detection: the selected box (an index into current.boxes), the class
    // new boxes get, the zoom (1: fitted) and the drag under way.
    selected: null,
    newClass: 0,
    zoom: 1,
    drag: null,
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
    const entry = { task, imageUrl: null, imageError: null, boxes: startBoxes(task) };
    if (entry.boxes && Array.isArray(task.boxes) && entry.boxes.length < task.boxes.length) {
      entry.dropped = task.boxes.length - entry.boxes.length;
    }
    await loadImage(entry);
    return entry;
  }

  // De-identification tasks are boxes too (faces, plates).
  const isDetection = (task) => task.task_kind === 'detection' || task.task_kind === 'deidentify';

  // The boxes a detection task starts from, with class indexes. A box of a
  // class the project lacks (a corrupt row: the scheduler names it by its
  // number) is left out, and the page says so when it shows the task.
  function startBoxes(task) {
    if (!isDetection(task)) return null;
    const given = Array.isArray(task.boxes) ? task.boxes : [];
    return given
      .map((b) => ({
        class: task.class_names.indexOf(b.class),
        x_min: b.x_min,
        y_min: b.y_min,
        x_max: b.x_max,
        y_max: b.y_max,
      }))
      .filter((b) => b.class >= 0);
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
    state.selected = null;
    state.drag = null;
    el('stage').scrollTo(0, 0);
    if (entry && entry.dropped) {
      say(boxCount(entry.dropped) + ' to start from had a class this project lacks and were left out.', true);
    }
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
    if (isDetection(entry.task)) {
      if (state.drag) return;
      if (!imageSize()) {
        say('The image is not shown yet: boxes can only be drawn on it.', true);
        return;
      }
      const names = entry.task.class_names;
      submit(entry, {
        boxes: entry.boxes.map((b) => ({
          class: names[b.class],
          x_min: b.x_min,
          y_min: b.y_min,
          x_max: b.x_max,
          y_max: b.y_max,
        })),
      });
      return;
    }
    const index = state.picked !== null ? state.picked : proposedIndex(entry.task);
    if (index === null) {
      say('There is no pre-label: pick a class with its key first.', true);
      return;
    }
    submit(entry, { class: entry.task.class_names[index] });
  }

  // Submit `answer` ({ class } or { boxes }) for `entry`. A refusal that
  // leaves the claim (422: a bad box) keeps everything on screen as it is.
  async function submit(entry, answer) {
    if (state.busy) return;
    state.busy = true;
    try {
      const label = await json(
        'POST',
        taskPath(entry.task, '/submit'),
        Object.assign({ fencing_token: entry.task.fencing_token }, answer),
      );
      const previous = state.last;
      state.last = {
        entry,
        undoUntil: label.undo_until ? Date.parse(label.undo_until) : null,
        className: label.class,
      };
      state.current = null;
      if (previous) forget(previous.entry);
      const what = answer.boxes ? 'with ' + boxCount(answer.boxes.length) : 'as ' + label.class;
      say('Labeled ' + entry.task.source + ' ' + what + '.' + (state.last.undoUntil ? ' U undoes it.' : ''));
      await advance();
    } catch (err) {
      await lost(entry, err);
      // A refused box: the reason, below the editor's help, brought into view.
      if (answer.boxes && err.status === 422) el('status').scrollIntoView({ block: 'nearest' });
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
      // A detection task comes back with the boxes just submitted, to
      // correct rather than draw again.
      if (!task.task_kind) task.task_kind = last.entry.task.task_kind;
      const boxes = last.entry.boxes ? last.entry.boxes.map((b) => Object.assign({}, b)) : startBoxes(task);
      const reopened = { task, imageUrl: last.entry.imageUrl, imageError: last.entry.imageError, boxes };
      // The task on screen becomes the next one again; a preloaded one goes
      // back to the queue.
      if (state.nextLoading) await state.nextLoading;
      const spare = state.next;
      state.next = state.current;
      state.current = reopened;
      state.picked = null;
      state.selected = null;
      state.drag = null;
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
    const detection = Boolean(entry) && isDetection(entry.task);
    el('keys').hidden = detection;
    el('box-keys').hidden = !detection;
    el('figure').classList.toggle('boxes', detection);
    el('zoom').hidden = !detection;
    el('proposal').hidden = detection;
    el('box-panel').hidden = !detection;
    if (!detection) layoutBoard(null);
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
    if (detection) {
      renderEditor(entry);
      return;
    }

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
      ...task.class_names.map((name, i) => classItem(name, i, i === state.picked, i === proposed)),
    );

    const chosen = state.picked !== null ? state.picked : proposed;
    const accept = el('accept');
    accept.replaceChildren(node('kbd', 'Enter'), document.createTextNode(
      chosen === null ? ' pick a class first' : ' label as ' + task.class_names[chosen],
    ));
    accept.disabled = chosen === null || state.busy;
  }

  // A class of the list, as a button with its key.
  function classItem(name, i, picked, proposed) {
    const button = node('button');
    button.type = 'button';
    button.dataset.index = String(i);
    if (picked) button.classList.add('picked');
    if (proposed) button.classList.add('proposed');
    button.append(node('span', CLASS_KEYS[i] ? CLASS_KEYS[i].toUpperCase() : '·', 'key'), node('span', name, 'name'));
    const item = node('li');
    item.append(button);
    return item;
  }

  // ---- the box editor (detection) ----------------------------------------

  const clamp = (v, low, high) => Math.min(high, Math.max(low, v));
  const boxCount = (n) => n + (n === 1 ? ' box' : ' boxes');
  const classLabel = (task, index) =>
    task.class_names[index] !== undefined ? task.class_names[index] : '#' + index;
  const corners = (b) => [b.x_min, b.y_min, b.x_max, b.y_max].map((v) => Math.round(v * 10) / 10).join(', ');

  // The original size of the image on screen, once it has loaded.
  function imageSize() {
    const entry = state.current;
    const image = el('image');
    if (!entry || !entry.imageUrl || image.src !== entry.imageUrl || !image.complete || !image.naturalWidth) {
      return null;
    }
    return { w: image.naturalWidth, h: image.naturalHeight };
  }

  // Size the board for the zoom (`null`: the classification layout, sized
  // by the style sheet); the screen pixels per image pixel.
  function layoutBoard(size) {
    const board = el('board');
    if (!size) {
      board.style.width = '';
      board.style.height = '';
      el('zoom-level').textContent = '';
      return null;
    }
    const fit = Math.min(el('figure').clientWidth / size.w, (window.innerHeight * 0.78) / size.h);
    const width = Math.max(1, Math.floor(size.w * fit * state.zoom));
    const height = Math.max(1, Math.floor(size.h * fit * state.zoom));
    board.style.width = width + 'px';
    board.style.height = height + 'px';
    el('zoom-level').textContent = Math.round((100 * width) / size.w) + '% (' + size.w + '×' + size.h + ')';
    return width / size.w;
  }

  function renderEditor(entry) {
    const task = entry.task;
    if (state.selected !== null && !entry.boxes[state.selected]) state.selected = null;
    if (state.newClass >= task.class_names.length) state.newClass = 0;
    const selected = state.selected !== null ? entry.boxes[state.selected] : null;
    const picked = selected ? selected.class : state.newClass;
    el('classes').replaceChildren(
      ...task.class_names.map((name, i) => classItem(name, i, i === picked, false)),
    );
    el('new-class').textContent = selected
      ? 'Box ' + (state.selected + 1) + ' selected, class ' + classLabel(task, selected.class) + '.'
      : 'New boxes: ' + classLabel(task, state.newClass) + '.';
    el('box-list').replaceChildren(
      ...entry.boxes.map((b, i) => {
        const button = node('button');
        button.type = 'button';
        button.dataset.box = String(i);
        if (i === state.selected) button.classList.add('selected');
        button.append(node('span', classLabel(task, b.class), 'name'), node('span', corners(b), 'coords'));
        const item = node('li');
        item.append(button);
        return item;
      }),
    );
    const accept = el('accept');
    const n = entry.boxes.length;
    accept.replaceChildren(node('kbd', 'Enter'), document.createTextNode(
      n === 0 ? ' submit: nothing to box' : ' submit ' + boxCount(n),
    ));
    accept.disabled = state.busy || !imageSize();
    renderOverlay(entry);
  }

  function svgNode(tag, attributes, classes) {
    const n = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) n.setAttribute(name, String(value));
    n.setAttribute('class', classes);
    return n;
  }

  // The boxes over the image, in the image's pixels (the viewBox); the
  // selected one last, on top, with its corner handles.
  function renderOverlay(entry) {
    const overlay = el('overlay');
    const size = imageSize();
    const scale = layoutBoard(size);
    if (!size) {
      overlay.replaceChildren();
      return;
    }
    overlay.setAttribute('viewBox', '0 0 ' + size.w + ' ' + size.h);
    overlay.setAttribute('preserveAspectRatio', 'none');
    const unit = 1 / scale; // one screen pixel, in image pixels
    const order = entry.boxes.map((_, i) => i).filter((i) => i !== state.selected);
    if (state.selected !== null) order.push(state.selected);
    const shapes = [];
    for (const i of order) {
      const b = entry.boxes[i];
      const colour = 'c' + (b.class % 8);
      const chosen = i === state.selected;
      const box = svgNode(
        'rect',
        { x: b.x_min, y: b.y_min, width: b.x_max - b.x_min, height: b.y_max - b.y_min },
        'box ' + colour + (chosen ? ' selected' : ''),
      );
      box.dataset.index = String(i);
      const tag = svgNode(
        'text',
        { x: b.x_min + 3 * unit, y: b.y_min + (TAG + 1) * unit, 'font-size': TAG * unit, 'stroke-width': 3 * unit },
        'tag ' + colour,
      );
      tag.textContent = classLabel(entry.task, b.class);
      shapes.push(box, tag);
      if (!chosen) continue;
      for (const corner of ['nw', 'ne', 'sw', 'se']) {
        const x = corner.includes('w') ? b.x_min : b.x_max;
        const y = corner.includes('n') ? b.y_min : b.y_max;
        const half = (HANDLE / 2) * unit;
        const handle = svgNode(
          'rect',
          { x: x - half, y: y - half, width: 2 * half, height: 2 * half },
          'handle ' + corner,
        );
        handle.dataset.index = String(i);
        handle.dataset.corner = corner;
        shapes.push(handle);
      }
    }
    overlay.replaceChildren(...shapes);
  }

  const editing = () => state.current && isDetection(state.current.task) && !state.busy;

  // Where the pointer is, in image pixels, kept inside the image.
  function pointAt(event, size) {
    const r = el('overlay').getBoundingClientRect();
    return {
      x: clamp(((event.clientX - r.left) * size.w) / r.width, 0, size.w),
      y: clamp(((event.clientY - r.top) * size.h) / r.height, 0, size.h),
    };
  }

  // The box spanned by two points, on whole image pixels.
  function spanned(a, b, cls) {
    const [ax, ay, bx, by] = [a.x, a.y, b.x, b.y].map(Math.round);
    return { class: cls, x_min: Math.min(ax, bx), y_min: Math.min(ay, by), x_max: Math.max(ax, bx), y_max: Math.max(ay, by) };
  }

  // A press on a corner handle resizes that box, on a box moves it (and
  // selects it), elsewhere (or with Shift) starts a new box.
  function onPointerDown(event) {
    const size = imageSize();
    if (event.button !== 0 || !editing() || !size || state.drag) return;
    event.preventDefault();
    const entry = state.current;
    const data = event.target.dataset || {};
    const index = data.index !== undefined ? Number(data.index) : null;
    const drag = {
      entry,
      pointer: event.pointerId,
      screen: { x: event.clientX, y: event.clientY },
      start: pointAt(event, size),
      moved: false,
      index: null,
      mode: 'draw',
    };
    if (index !== null && entry.boxes[index] && (data.corner || !event.shiftKey)) {
      drag.mode = data.corner ? 'resize' : 'move';
      drag.corner = data.corner;
      drag.index = index;
      drag.origin = Object.assign({}, entry.boxes[index]);
      state.selected = index;
    }
    state.drag = drag;
    el('overlay').setPointerCapture(event.pointerId);
    render();
  }

  function onPointerMove(event) {
    const drag = state.drag;
    const size = imageSize();
    if (!drag || event.pointerId !== drag.pointer || !size) return;
    if (drag.entry !== state.current) {
      state.drag = null;
      return;
    }
    const travelled = Math.hypot(event.clientX - drag.screen.x, event.clientY - drag.screen.y);
    if (!drag.moved && travelled < DRAG_THRESHOLD) return;
    drag.moved = true;
    const p = pointAt(event, size);
    const boxes = drag.entry.boxes;
    if (drag.mode === 'draw') {
      if (drag.index === null) {
        boxes.push(spanned(drag.start, p, state.newClass));
        drag.index = boxes.length - 1;
        state.selected = drag.index;
      }
      boxes[drag.index] = spanned(drag.start, p, boxes[drag.index].class);
    } else if (drag.mode === 'move') {
      const o = drag.origin;
      const w = o.x_max - o.x_min;
      const h = o.y_max - o.y_min;
      const x = clamp(o.x_min + Math.round(p.x - drag.start.x), 0, size.w - w);
      const y = clamp(o.y_min + Math.round(p.y - drag.start.y), 0, size.h - h);
      boxes[drag.index] = { class: boxes[drag.index].class, x_min: x, y_min: y, x_max: x + w, y_max: y + h };
    } else {
      // The opposite corner stays exactly where it was (an imported box
      // may have fractions); the dragged one follows the pointer.
      const o = drag.origin;
      const fx = drag.corner.includes('w') ? o.x_max : o.x_min;
      const fy = drag.corner.includes('n') ? o.y_max : o.y_min;
      const [mx, my] = [Math.round(p.x), Math.round(p.y)];
      const moved = {
        class: boxes[drag.index].class,
        x_min: Math.min(fx, mx),
        y_min: Math.min(fy, my),
        x_max: Math.max(fx, mx),
        y_max: Math.max(fy, my),
      };
      boxes[drag.index] = moved;
    }
    render();
  }

  // The end of a press: a box too small to keep is dropped (a new one) or
  // put back (a resized one); a click on the bare image selects nothing.
  function onPointerUp(event) {
    const drag = state.drag;
    if (!drag || event.pointerId !== drag.pointer) return;
    state.drag = null;
    const boxes = drag.entry.boxes;
    const b = drag.index !== null ? boxes[drag.index] : null;
    if (b && (b.x_max - b.x_min < 1 || b.y_max - b.y_min < 1)) {
      if (drag.mode === 'draw') {
        boxes.splice(drag.index, 1);
        state.selected = null;
      } else {
        boxes[drag.index] = drag.origin;
      }
    } else if (drag.mode === 'draw' && !drag.moved) {
      state.selected = null;
    }
    render();
  }

  // Esc during a drag: everything as it was before the press.
  function cancelDrag() {
    const drag = state.drag;
    state.drag = null;
    if (drag.index === null) return;
    if (drag.mode === 'draw') {
      drag.entry.boxes.splice(drag.index, 1);
      state.selected = null;
    } else {
      drag.entry.boxes[drag.index] = drag.origin;
    }
  }

  // Zoom to `zoom` (relative to the fitted image), keeping the middle of
  // what is in view in the middle.
  function zoomTo(zoom) {
    const stage = el('stage');
    const board = el('board');
    const before = { w: board.clientWidth, h: board.clientHeight };
    const cx = (stage.scrollLeft + stage.clientWidth / 2) / (before.w || 1);
    const cy = (stage.scrollTop + stage.clientHeight / 2) / (before.h || 1);
    state.zoom = clamp(zoom, ZOOM_MIN, ZOOM_MAX);
    render();
    stage.scrollLeft = cx * board.clientWidth - stage.clientWidth / 2;
    stage.scrollTop = cy * board.clientHeight - stage.clientHeight / 2;
  }

  // Scroll the selected box into view (a zoomed image).
  function reveal(entry, size) {
    const b = entry.boxes[state.selected];
    if (!b) return;
    const stage = el('stage');
    const scale = el('board').clientWidth / size.w;
    const [left, top, right, bottom] = [b.x_min, b.y_min, b.x_max, b.y_max].map((v) => v * scale);
    if (left < stage.scrollLeft || right > stage.scrollLeft + stage.clientWidth) stage.scrollLeft = left - 20;
    if (top < stage.scrollTop || bottom > stage.scrollTop + stage.clientHeight) stage.scrollTop = top - 20;
  }

  // A key of the box editor; true when it was one (and was applied).
  function boxKey(event, entry, key) {
    const size = imageSize();
    const boxes = entry.boxes;
    const chosen = state.selected !== null ? boxes[state.selected] : null;
    if (state.drag) {
      if (key !== 'Escape') return false;
      cancelDrag();
      return true;
    }
    const arrow = ARROWS[key];
    if (arrow) {
      if (!chosen || !size) return false;
      const step = event.shiftKey ? 10 : 1;
      const [dx, dy] = [arrow[0] * step, arrow[1] * step];
      if (event.altKey || event.ctrlKey) {
        // Resize: the bottom-right corner moves, the box keeps a pixel.
        chosen.x_max = clamp(chosen.x_max + dx, chosen.x_min + 1, size.w);
        chosen.y_max = clamp(chosen.y_max + dy, chosen.y_min + 1, size.h);
      } else {
        const w = chosen.x_max - chosen.x_min;
        const h = chosen.y_max - chosen.y_min;
        chosen.x_min = clamp(chosen.x_min + dx, 0, size.w - w);
        chosen.y_min = clamp(chosen.y_min + dy, 0, size.h - h);
        chosen.x_max = chosen.x_min + w;
        chosen.y_max = chosen.y_min + h;
      }
      return true;
    }
    if (event.ctrlKey || event.altKey) return false;
    if (key === 'Delete' || key === 'Backspace') {
      if (!chosen) return false;
      boxes.splice(state.selected, 1);
      state.selected = null;
      return true;
    }
    if (key === 'Tab') {
      if (boxes.length === 0) return false;
      const n = boxes.length;
      if (state.selected === null) state.selected = event.shiftKey ? n - 1 : 0;
      else state.selected = (state.selected + (event.shiftKey ? n - 1 : 1)) % n;
      if (size) reveal(entry, size);
      return true;
    }
    if (key === 'Escape') {
      state.selected = null;
      return true;
    }
    if (key === '+' || key === '=') {
      zoomTo(state.zoom * ZOOM_STEP);
      return true;
    }
    if (key === '-' || key === '_') {
      zoomTo(state.zoom / ZOOM_STEP);
      return true;
    }
    const index = CLASS_KEYS.indexOf(key);
    if (index >= 0 && index < entry.task.class_names.length) {
      if (chosen) chosen.class = index;
      else state.newClass = index;
      return true;
    }
    return false;
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
    if (!state.started || event.metaKey || event.isComposing) return;
    const target = event.target;
    // Typing in a field (the skip reason) is not a command.
    if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    // The box editor's keys first: some come with Alt or Ctrl.
    if (editing() && boxKey(event, state.current, key)) {
      event.preventDefault();
      render();
      return;
    }
    if (event.ctrlKey || event.altKey) return;
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
      const index = Number(button.dataset.index);
      if (isDetection(state.current.task)) {
        const chosen = state.selected !== null ? state.current.boxes[state.selected] : null;
        if (chosen) chosen.class = index;
        else state.newClass = index;
      } else {
        state.picked = index;
      }
      button.blur();
      render();
    });
    el('box-list').addEventListener('click', (event) => {
      const button = event.target.closest('button[data-box]');
      if (!button || !editing()) return;
      state.selected = Number(button.dataset.box);
      button.blur();
      render();
    });
    const overlay = el('overlay');
    overlay.addEventListener('pointerdown', onPointerDown);
    overlay.addEventListener('pointermove', onPointerMove);
    overlay.addEventListener('pointerup', onPointerUp);
    overlay.addEventListener('pointercancel', onPointerUp);
    for (const [id, factor] of [['zoom-in', ZOOM_STEP], ['zoom-out', 1 / ZOOM_STEP], ['zoom-fit', 0]]) {
      el(id).addEventListener('click', (event) => {
        event.currentTarget.blur();
        zoomTo(factor === 0 ? 1 : state.zoom * factor);
      });
    }
    // The board is sized from the image's own size and the window's.
    el('image').addEventListener('load', () => {
      if (state.current && isDetection(state.current.task)) render();
    });
    window.addEventListener('resize', () => {
      if (state.current && isDetection(state.current.task)) render();
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
