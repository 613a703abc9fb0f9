/*
 * gcg web viewer — app.js
 * Plain ES2020, no dependencies, no build step. Talks to the same-origin API of `gcg`:
 *   GET  /api/health                 model description for the header
 *   GET  /api/videos, POST /api/videos (multipart field `video`)
 *   POST /api/videos/{id}/ask        {question, options} -> answer + moments + span + p(t)
 *   GET  /api/videos/{id}/frames/{i} sampled frame i (JPEG)
 *   GET  /api/videos/{id}/media      original file for <video> (when `playable`)
 * Flow: pick/upload a video -> ask -> draw the answer, option scores, span + moments on
 * the timeline, the p(t) curve and the moment thumbnails; answers are kept per video id.
 * Two players share one seek behaviour: the <video> element, or (frame folders, or a
 * codec the browser cannot play) a "frame player" showing the nearest sampled frame.
 * Test hook: window.gcgViewer = { currentTime(), seek(t) }.
 */
'use strict';

const $ = (id) => document.getElementById(id);
const SVG_NS = 'http://www.w3.org/2000/svg';
const HISTORY_KEY = 'gcg-viewer-history';
const HISTORY_MAX = 50;

const fmt = (t) => `${Number(t).toFixed(1)} s`;
const frameUrl = (id, i) => `/api/videos/${encodeURIComponent(id)}/frames/${i}`;

/** Small DOM builder: el('button', {class: 'x', onclick: f, text: 'hi'}, child...). */
function el(tag, attrs = {}, ...kids) {
  const n = document.createElement(tag);
  setAttrs(n, attrs);
  for (const k of kids) if (k != null) n.append(k);
  return n;
}
function svgEl(tag, attrs = {}) {
  const n = document.createElementNS(SVG_NS, tag);
  setAttrs(n, attrs);
  return n;
}
function setAttrs(n, attrs) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') n.setAttribute('class', v);
    else if (k === 'text') n.textContent = v;
    else if (k.startsWith('on')) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v === true ? '' : String(v));
  }
}

const state = {
  videos: [],
  video: null,        // selected video object
  result: null,       // answer currently drawn
  mode: 'none',       // 'video' | 'frames' | 'none'
  frameTime: 0,       // current time of the frame player
  pendingSeek: null,  // seek requested before the <video> had metadata
  busy: false,
  history: loadHistory(), // { videoId: [result, ...] }, newest first
};
const player = $('player');

// ---------------------------------------------------------------- API helpers

async function api(path, opts) {
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new Error(`Network error: ${e.message}`);
  }
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!res.ok) {
    const msg = (body && body.error) ||
      (res.status === 413 ? 'The video is too large for this server.' : `${res.status} ${res.statusText}`);
    throw new Error(msg);
  }
  return body;
}

function showError(msg) {
  const box = $('error');
  box.textContent = msg || '';
  box.hidden = !msg;
}

function loadHistory() {
  try { return JSON.parse(sessionStorage.getItem(HISTORY_KEY)) || {}; } catch (e) { return {}; }
}
function saveHistory() {
  try { sessionStorage.setItem(HISTORY_KEY, JSON.stringify(state.history)); } catch (e) { /* memory only */ }
}

// ---------------------------------------------------------------- model + videos

async function loadHealth() {
  try {
    const h = await api('/api/health');
    const m = (h && h.model) || {};
    const parts = [m.run, m.mode, m.frames != null ? `T=${m.frames}` : null,
      m.moments != null ? `K=${m.moments}` : null, m.checkpoint];
    $('model').textContent = parts.filter((x) => x != null && x !== '').join(' · ') || 'model ready';
  } catch (e) {
    $('model').textContent = `model unavailable (${e.message})`;
  }
}

async function loadVideos() {
  try {
    const r = await api('/api/videos');
    state.videos = (r && r.videos) || [];
  } catch (e) {
    showError(e.message);
  }
  renderVideos();
  const wanted = decodeURIComponent(location.hash.slice(1));
  const v = state.videos.find((x) => x.id === wanted) || state.videos[0];
  if (v) selectVideo(v);
}

function renderVideos() {
  const list = $('videos');
  list.replaceChildren();
  if (!state.videos.length) list.append(el('li', { class: 'empty muted small', text: 'No videos yet — upload one.' }));
  for (const v of state.videos) {
    const meta = [v.duration != null ? fmt(v.duration) : null, v.frames ? `${v.frames} frames` : null]
      .filter(Boolean).join(' · ');
    const current = state.video && state.video.id === v.id;
    list.append(el('li', {}, el('button', {
      type: 'button', class: 'video-item', 'data-id': v.id, 'aria-current': current ? 'true' : null,
      onclick: () => selectVideo(v),
    }, el('span', { class: 'name', text: v.name || v.id }),
    el('span', { class: 'meta muted small', text: meta }),
    v.gallery ? el('span', { class: 'badge', text: 'gallery' }) : null)));
  }
}

function upload(file) {
  const prog = $('upload-progress');
  const status = $('upload-status');
  const input = $('upload');
  const form = new FormData();
  form.append('video', file);
  const xhr = new XMLHttpRequest();
  xhr.open('POST', '/api/videos');
  prog.hidden = false;
  prog.value = 0;
  input.disabled = true;
  status.textContent = `Uploading ${file.name}…`;
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) prog.value = e.loaded / e.total; };
  xhr.upload.onload = () => { status.textContent = `Processing ${file.name}…`; prog.removeAttribute('value'); };
  xhr.onloadend = () => {
    input.disabled = false;
    input.value = '';
    prog.hidden = true;
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
    if ((xhr.status === 201 || xhr.status === 200) && body && body.id) {
      status.textContent = `Uploaded ${body.name || file.name}.`;
      // Newest upload first, as the server lists them.
      state.videos = [body].concat(state.videos.filter((x) => x.id !== body.id));
      showError('');
      renderVideos();
      selectVideo(body);
      return;
    }
    let msg;
    if (xhr.status === 413) msg = 'the video is too large.';
    else if (xhr.status === 0) msg = 'network error.';
    else msg = (body && body.error) || `${xhr.status} ${xhr.statusText}`;
    status.textContent = `Upload failed: ${msg}`;
    showError(`Upload failed: ${msg}`);
  };
  xhr.send(form);
}

function selectVideo(v) {
  state.video = v;
  state.result = null;
  showError('');
  const hash = '#' + encodeURIComponent(v.id);
  if (location.hash !== hash) history.replaceState(null, '', hash);
  renderVideos();
  $('video-title').textContent = v.name || v.id;
  $('ask').disabled = state.busy;
  setupPlayer(v);
  renderExamples(v);
  const past = state.history[v.id];
  showResult(past && past.length ? past[0] : null);
}

// ---------------------------------------------------------------- players

/** Timestamps (s) of the sampled frames: from the latest answer, else estimated uniformly. */
function timestamps() {
  const v = state.video;
  if (!v) return [];
  if (state.result && Array.isArray(state.result.timestamps)) return state.result.timestamps;
  if (Array.isArray(v.timestamps) && v.timestamps.length) return v.timestamps;
  if (v._ts) return v._ts;
  const T = v.frames || 0;
  return Array.from({ length: T }, (_, i) => (v.duration ? ((i + 0.5) * v.duration) / T : i));
}

/** Length of the timeline: the video's duration, else the last frame's timestamp. */
function duration() {
  const v = state.video;
  if (!v) return 1;
  if (v.duration) return v.duration;
  const ts = timestamps();
  return (ts.length && ts[ts.length - 1]) || 1;
}

function setupPlayer(v) {
  state.pendingSeek = null;
  state.frameTime = 0;
  if (v.playable) {
    state.mode = 'video';
    $('frame-player').hidden = true;
    $('player-note').hidden = true;
    player.hidden = false;
    player.src = `/api/videos/${encodeURIComponent(v.id)}/media`;
  } else {
    useFramePlayer('');
  }
  updatePlayhead();
}

function useFramePlayer(note) {
  state.mode = 'frames';
  if (player.getAttribute('src')) {
    player.pause();
    player.removeAttribute('src');
    player.load();
  }
  player.hidden = true;
  $('frame-player').hidden = false;
  $('player-note').textContent = note;
  $('player-note').hidden = !note;
  $('frame-slider').max = String(duration());
  showFrameAt(state.frameTime);
}

function nearestFrame(t) {
  const ts = timestamps();
  let best = 0;
  for (let i = 1; i < ts.length; i++) if (Math.abs(ts[i] - t) < Math.abs(ts[best] - t)) best = i;
  return best;
}

function showFrameAt(t, frame) {
  const v = state.video;
  if (!v || !v.frames) return;
  const i = frame != null ? frame : nearestFrame(t);
  const img = $('frame-view');
  const src = frameUrl(v.id, i);
  if (img.getAttribute('src') !== src) img.src = src;
  const ts = timestamps();
  img.alt = `Frame ${i + 1} of ${v.frames} (${fmt(ts[i] != null ? ts[i] : t)})`;
  img.dataset.frame = String(i);
  $('frame-slider').value = String(t);
  $('frame-time').textContent = `${fmt(t)} · frame ${i + 1}/${v.frames}`;
}

function currentTime() {
  if (state.mode === 'video') return state.pendingSeek != null ? state.pendingSeek : player.currentTime;
  return state.frameTime;
}

/** Seek either player to `t` seconds; `frame` (optional) is the sampled frame to show. */
function seek(t, frame) {
  t = Math.max(0, Number(t) || 0);
  if (state.mode === 'video') {
    if (player.readyState >= 1) player.currentTime = t;
    else state.pendingSeek = t;
  } else if (state.mode === 'frames') {
    state.frameTime = t;
    showFrameAt(t, frame);
  }
  updatePlayhead();
}

function updatePlayhead() {
  const ph = $('playhead');
  if (ph) ph.style.left = `${Math.min(100, (currentTime() / duration()) * 100)}%`;
}

player.addEventListener('loadedmetadata', () => {
  if (state.pendingSeek != null) {
    player.currentTime = state.pendingSeek;
    state.pendingSeek = null;
  }
  updatePlayhead();
});
player.addEventListener('timeupdate', updatePlayhead);
player.addEventListener('seeked', updatePlayhead);
player.addEventListener('error', () => {
  // Unsupported codec / container: fall back to the sampled frames.
  if (state.mode !== 'video' || !player.getAttribute('src')) return;
  state.frameTime = currentTime();
  state.pendingSeek = null;
  useFramePlayer('This browser cannot play this video; showing the sampled frames instead.');
  updatePlayhead();
});
$('frame-slider').addEventListener('input', (e) => seek(e.target.value));

window.gcgViewer = { currentTime, seek: (t) => seek(t) };

// ---------------------------------------------------------------- drawing an answer

function showResult(r) {
  state.result = r;
  if (r && Array.isArray(r.timestamps) && state.video) state.video._ts = r.timestamps;
  if (state.mode === 'frames') {
    $('frame-slider').max = String(duration());
    showFrameAt(state.frameTime);
  }
  drawTimeline();
  drawCurve();
  drawThumbs();
  drawAnswer();
  renderHistory();
}

function drawTimeline() {
  const tl = $('timeline');
  const r = state.result;
  const d = duration();
  const pct = (t) => Math.min(100, Math.max(0, (t / d) * 100));
  tl.replaceChildren(el('div', { class: 'track' }));
  if (r && Array.isArray(r.span)) {
    const [a, b] = r.span;
    tl.append(el('div', {
      class: 'span', title: `span ${fmt(a)} – ${fmt(b)}`,
      style: `left:${pct(a)}%;width:${Math.max(0.5, pct(b) - pct(a))}%`,
    }));
  }
  ((r && r.moments) || []).forEach((m, k) => tl.append(el('button', {
    type: 'button', class: 'moment', 'data-time': m.time, 'data-frame': m.frame, 'data-label': fmt(m.time),
    title: `Moment ${k + 1}: ${fmt(m.time)}`, 'aria-label': `Seek to moment ${k + 1} at ${fmt(m.time)}`,
    style: `left:${pct(m.time)}%`,
    onclick: (e) => { e.stopPropagation(); seek(m.time, m.frame); },
  })));
  tl.append(el('div', { id: 'playhead', class: 'playhead' }));
  $('tl-end').textContent = state.video ? fmt(d) : '';
  updatePlayhead();
}

// Clicking the bar itself (not a marker) seeks to that position.
$('timeline').addEventListener('click', (e) => {
  if (!state.video || e.target.closest('.moment')) return;
  const rect = e.currentTarget.getBoundingClientRect();
  seek(((e.clientX - rect.left) / rect.width) * duration());
});

function drawCurve() {
  const svg = $('curve');
  const r = state.result;
  svg.replaceChildren();
  const ok = r && Array.isArray(r.p) && r.p.length && Array.isArray(r.timestamps);
  svg.toggleAttribute('hidden', !ok);
  if (!ok) return;
  const W = Math.max(200, Math.round(svg.getBoundingClientRect().width) || 600);
  const H = 80;
  const pad = 6;
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  const d = duration();
  const pmax = Math.max(1e-9, ...r.p.filter(Number.isFinite));
  const x = (t) => (Math.min(d, Math.max(0, t)) / d) * W;
  const y = (p) => H - pad - ((Number.isFinite(p) ? p : 0) / pmax) * (H - 2 * pad);
  const pts = r.p.map((p, i) => `${x(r.timestamps[i]).toFixed(1)},${y(p).toFixed(1)}`);
  if (Array.isArray(r.span)) {
    const [a, b] = r.span;
    svg.append(svgEl('rect', { class: 'c-span', x: x(a), y: 0, width: Math.max(1, x(b) - x(a)), height: H }));
  }
  const first = x(r.timestamps[0]).toFixed(1);
  const last = x(r.timestamps[r.p.length - 1]).toFixed(1);
  svg.append(svgEl('polygon', { class: 'c-area', points: `${first},${H - pad} ${pts.join(' ')} ${last},${H - pad}` }));
  svg.append(svgEl('polyline', { class: 'c-line', points: pts.join(' ') }));
  for (const m of r.moments || []) {
    const dot = svgEl('circle', { class: 'c-dot', cx: x(m.time), cy: y(r.p[m.frame]), r: 4.5 });
    const tip = svgEl('title');
    tip.textContent = `${fmt(m.time)} · p=${Number(r.p[m.frame] || 0).toFixed(3)}`;
    dot.append(tip);
    svg.append(dot);
  }
  svg.append(svgEl('text', { class: 'c-label', x: 4, y: 12, text: 'p(t)' }));
}

$('curve').addEventListener('click', (e) => {
  const rect = e.currentTarget.getBoundingClientRect();
  if (rect.width) seek(((e.clientX - rect.left) / rect.width) * duration());
});
if (window.ResizeObserver) new ResizeObserver(() => drawCurve()).observe($('curve-wrap'));

function drawThumbs() {
  const box = $('thumbs');
  box.replaceChildren();
  const r = state.result;
  if (!r || !state.video) return;
  const id = r.video || state.video.id;
  (r.moments || []).forEach((m, k) => box.append(el('figure', { class: 'thumb-fig' },
    el('button', {
      type: 'button', class: 'thumb-btn', 'aria-label': `Seek to moment ${k + 1} at ${fmt(m.time)}`,
      onclick: () => seek(m.time, m.frame),
    }, el('img', {
      class: 'thumb', src: frameUrl(id, m.frame), alt: `Moment ${k + 1}, frame ${m.frame + 1}`,
      'data-time': m.time, 'data-frame': m.frame, loading: 'lazy',
    })),
    el('figcaption', { class: 'small', text: fmt(m.time) }))));
}

/** Option scores are log-likelihoods: softmax them for display. */
function softmax(xs) {
  const v = xs.map((x) => (typeof x === 'number' && !Number.isNaN(x) ? x : -Infinity));
  const m = Math.max(...v);
  if (!Number.isFinite(m)) return v.map(() => 1 / v.length);
  const e = v.map((x) => Math.exp(x - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / s);
}

function drawAnswer() {
  const r = state.result;
  $('answer').hidden = !r;
  if (!r) return;
  $('answer-question').textContent = `Q: ${r.question}`;
  $('answer-text').textContent = r.answer;
  const list = $('scores');
  list.replaceChildren();
  const opts = r.options || [];
  const scores = Array.isArray(r.option_scores) && r.option_scores.length === opts.length ? r.option_scores : null;
  const probs = scores ? softmax(scores) : null;
  let chosen = r.answer_index;
  if (chosen == null && probs) chosen = probs.indexOf(Math.max(...probs));
  opts.forEach((o, i) => {
    const pc = probs ? `${(probs[i] * 100).toFixed(1)}%` : '';
    list.append(el('li', {
      class: i === chosen ? 'score chosen' : 'score',
      title: scores ? `log-likelihood ${Number(scores[i]).toFixed(3)}` : null,
      'aria-current': i === chosen ? 'true' : null,
    }, el('span', { class: 'opt', text: o }),
    el('span', { class: 'bar' }, el('span', { class: 'fill', style: `width:${probs ? probs[i] * 100 : 0}%` })),
    el('span', { class: 'pct', text: pc })));
  });
  list.hidden = !opts.length;
  $('span-text').textContent = Array.isArray(r.span) ? `Supported from ${fmt(r.span[0])} to ${fmt(r.span[1])}` : '';
  const notes = Array.isArray(r.notes) ? r.notes : [];
  $('answer-notes').textContent = notes.map((n) => `Note: ${n}.`).join(' ');
  $('answer-notes').hidden = !notes.length;
  $('timings').textContent = Object.entries(r.seconds || {})
    .map(([k, s]) => `${k} ${Number(s).toFixed(2)} s`).join(' · ');
}

function renderHistory() {
  const list = $('history-list');
  list.replaceChildren();
  const items = (state.video && state.history[state.video.id]) || [];
  $('history-empty').hidden = items.length > 0;
  for (const r of items) {
    list.append(el('li', {}, el('button', {
      type: 'button', class: r === state.result ? 'hist-item active' : 'hist-item',
      'aria-current': r === state.result ? 'true' : null,
      onclick: () => showResult(r),
    }, el('span', { class: 'q', text: r.question }), el('span', { class: 'a muted small', text: r.answer }))));
  }
}

// ---------------------------------------------------------------- question form

function relabelOptions() {
  [...$('options').children].forEach((row, i) => {
    row.querySelector('.option').setAttribute('aria-label', `Option ${i + 1}`);
    row.querySelector('.option').placeholder = `Option ${i + 1}`;
    row.querySelector('.remove-option').setAttribute('aria-label', `Remove option ${i + 1}`);
  });
}

function addOption(value = '') {
  const input = el('input', { type: 'text', class: 'option' });
  input.value = value;
  const row = el('div', { class: 'option-row' }, input, el('button', {
    type: 'button', class: 'remove-option secondary', text: '×',
    onclick: () => { row.remove(); relabelOptions(); },
  }));
  $('options').append(row);
  relabelOptions();
  return input;
}

function renderExamples(v) {
  const box = $('examples');
  box.replaceChildren();
  const qs = (v && v.questions) || [];
  $('examples-wrap').hidden = !qs.length;
  for (const ex of qs) {
    box.append(el('button', {
      type: 'button', class: 'chip', text: ex.question,
      title: ex.options && ex.options.length ? `Options: ${ex.options.join(' / ')}` : null,
      onclick: () => {
        $('question').value = ex.question || '';
        $('options').replaceChildren();
        (ex.options || []).forEach((o) => addOption(o));
      },
    }));
  }
}

function setBusy(b) {
  state.busy = b;
  $('ask').disabled = b || !state.video;
  $('ask').textContent = b ? 'Asking…' : 'Ask';
  $('spinner').hidden = !b;
  $('ask-form').setAttribute('aria-busy', b ? 'true' : 'false');
}

async function onAsk(e) {
  e.preventDefault();
  if (state.busy || !state.video) return;
  const question = $('question').value.trim();
  if (!question) {
    showError('Type a question first.');
    return;
  }
  const options = [...document.querySelectorAll('#options .option')].map((i) => i.value.trim()).filter(Boolean);
  const v = state.video;
  setBusy(true);
  showError('');
  try {
    const r = await api(`/api/videos/${encodeURIComponent(v.id)}/ask`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ question, options }),
    });
    r.video = r.video || v.id;
    const list = state.history[v.id] || (state.history[v.id] = []);
    list.unshift(r);
    list.length = Math.min(list.length, HISTORY_MAX);
    saveHistory();
    if (state.video === v) showResult(r);
  } catch (err) {
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

$('ask-form').addEventListener('submit', onAsk);
$('add-option').addEventListener('click', () => addOption().focus());
$('upload').addEventListener('change', (e) => {
  const f = e.target.files && e.target.files[0];
  if (f) upload(f);
});

loadHealth();
loadVideos();
