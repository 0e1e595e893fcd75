// The amqp-go web UI: one page over the management HTTP API (api/...), with hash routes:
// #/overview, #/connections, #/channels, #/exchanges[/{vhost}/{name}],
// #/queues[/{vhost}/{name}], #/users, #/vhosts and #/login.
//
// It logs in with HTTP Basic credentials, kept in sessionStorage and sent by fetch in an
// Authorization header; when the broker refuses them, it returns to the login form. Data
// reaches the DOM only as text (text nodes and textContent, never HTML), and the page runs
// under a Content-Security-Policy with no inline script or style (see ui.go).
'use strict';

const authKey = 'amqp-go.auth'; // sessionStorage: the Authorization header
const whoKey = 'amqp-go.who'; // sessionStorage: /api/whoami's answer
const pollMs = 5000; // how often the open page refreshes and the overview is sampled
const chartPoints = 60; // samples the charts keep: five minutes at pollMs
const pageSize = 100; // rows of a list page

const samples = []; // {publish, deliver, ready, unacked}, oldest first
let overview = null; // the last /api/overview
const page = { gen: 0, refresh: null }; // the page on show, and how to refresh it

const main = document.getElementById('main');
const statusLine = document.getElementById('status');
const enc = encodeURIComponent;

// --- DOM helpers: strings always become text nodes ---

// el makes an element: attributes (a function value for "onclick" and the like is an
// event listener, true sets an empty attribute, false and null leave it out) and
// children (nodes, or anything else as text).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (typeof v === 'function') e.addEventListener(k.replace(/^on/, ''), v);
    else if (v === true) e.setAttribute(k, '');
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// link is a link to a route made of path segments, each escaped.
function link(text, ...segments) {
  return el('a', { href: '#/' + segments.map(enc).join('/') }, text);
}

function fmt(n) {
  return typeof n === 'number' ? n.toLocaleString('en') : '';
}

function fmtRate(details) {
  const r = details && typeof details.rate === 'number' ? details.rate : 0;
  return { num: r.toFixed(1) };
}

function fmtTime(ms) {
  return ms ? new Date(ms).toLocaleString() : '';
}

// tags shows a list of words as tags, a space between them.
function tags(list) {
  return list.flatMap((t, i) => [i ? ' ' : '', el('span', { class: 'tag' }, t)]);
}

// table makes a table with a caption and column headers; table.fill(rows) shows rows, each
// an array of cells: text, a node, a number (right-aligned), or {num: text}. A refresh
// leaves the rows alone while the keyboard focus is in them.
function table(caption, columns) {
  const body = el('tbody');
  const t = el('table', {}, el('caption', {}, caption),
    el('thead', {}, el('tr', {}, columns.map(c => el('th', { scope: 'col' }, c)))), body);
  t.fill = rows => {
    if (body.contains(document.activeElement)) return;
    if (!rows.length) {
      body.replaceChildren(el('tr', {}, el('td', { colspan: columns.length, class: 'empty' }, 'None')));
      return;
    }
    const heads = t.tHead.rows[0].cells;
    body.replaceChildren(...rows.map(r => el('tr', {}, r.map((cell, i) => {
      const num = typeof cell === 'number' || (cell && cell.num !== undefined);
      if (num) heads[i].className = 'num';
      if (typeof cell === 'number') return el('td', { class: 'num' }, fmt(cell));
      if (num) return el('td', { class: 'num' }, cell.num);
      return el('td', {}, cell);
    }))));
  };
  t.fill([]);
  return t;
}

// facts is a list of name and value pairs.
function facts(pairs) {
  return el('dl', { class: 'facts' }, pairs.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
}

function input(name, label, attrs) {
  return el('label', {}, label, el('input', { type: 'text', name, ...attrs }));
}

function checkbox(name, label, checked) {
  return el('label', { class: 'check' }, el('input', { type: 'checkbox', name, checked }), label);
}

function textarea(name, label, attrs) {
  return el('label', {}, label, el('textarea', { name, ...attrs }));
}

// choice is a select of [value, text] options.
function choice(name, label, options, value) {
  const s = el('select', { name });
  setOptions(s, options, value);
  return el('label', {}, label, s);
}

function setOptions(select, options, value) {
  const keep = value === undefined ? select.value : value;
  select.replaceChildren(...options.map(([v, text]) => el('option', { value: v }, text)));
  if (options.some(([v]) => v === keep)) select.value = keep;
}

// vhostChoice is a select of the vhosts the user sees.
function vhostChoice(name) {
  const c = choice(name || 'vhost', 'Virtual host', [['/', '/']], '/');
  const s = c.querySelector('select');
  api('GET', 'vhosts').then(vhs => setOptions(s, vhs.map(v => [v.name, v.name])), showError);
  return c;
}

// form makes a form with a legend; action(form) runs on submit, its errors shown.
function form(legend, fields, submit, action) {
  const button = el('button', { type: 'submit' }, submit);
  const f = el('form', {}, el('fieldset', {}, el('legend', {}, legend), fields, button));
  f.addEventListener('submit', async ev => {
    ev.preventDefault();
    button.disabled = true;
    try {
      await action(f.elements);
    } catch (e) {
      showError(e);
    } finally {
      button.disabled = false;
    }
  });
  return f;
}

// action is a button that runs fn after the user confirms question (if any). It gives up
// the focus, so that the table it sits in refreshes.
function action(text, question, fn) {
  const b = el('button', {
    type: 'button', class: 'danger', onclick: async () => {
      if (question && !confirm(question)) return;
      b.disabled = true;
      b.blur();
      try {
        await fn();
      } catch (e) {
        showError(e);
      } finally {
        b.disabled = false;
      }
    },
  }, text);
  return b;
}

// jsonObject reads a JSON object typed into a form, or {} from an empty field.
function jsonObject(text, what) {
  if (!text.trim()) return {};
  let v;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} is not JSON: ${e.message}`);
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new Error(`${what} must be a JSON object`);
  return v;
}

// go shows the route hash, then note (an Error is shown as an error).
let pendingNote = null;
function go(hash, note) {
  if (location.hash === hash) {
    statusLine.hidden = true;
    route();
    showNote(note);
    return;
  }
  pendingNote = note;
  location.hash = hash;
}

function showNote(note) {
  if (note instanceof Error) showError(note);
  else if (note) say(note);
}

function say(text) {
  statusLine.className = '';
  statusLine.textContent = text;
  statusLine.hidden = false;
}

function showError(e) {
  if (e instanceof LoggedOut) return;
  statusLine.className = 'error';
  statusLine.textContent = e && e.message ? e.message : String(e);
  statusLine.hidden = false;
}

// --- the API ---

class LoggedOut extends Error {}

function authHeader() {
  return sessionStorage.getItem(authKey);
}

function who() {
  let w = null;
  try {
    w = JSON.parse(sessionStorage.getItem(whoKey));
  } catch {
    w = null;
  }
  return { name: (w && w.name) || '', tags: (w && w.tags) || [] };
}

function isAdmin() {
  return who().tags.includes('administrator');
}

// request sends a request with the saved credentials. credentials: 'omit' keeps the
// browser's own login prompt away when the answer is 401.
function request(method, path, body, auth) {
  const init = { method, headers: { Authorization: auth || '' }, credentials: 'omit', cache: 'no-store' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  return fetch('api/' + path, init);
}

// api calls the management API and returns the decoded answer (null when it has none). A
// failure throws an Error with RabbitMQ's reason. A 401 is either refused credentials
// (then the user logs in again) or a refused action (shown as an error).
async function api(method, path, body) {
  const auth = authHeader();
  if (!auth) throw new LoggedOut();
  const res = await request(method, path, body, auth);
  if (res.status === 401) {
    const check = await request('GET', 'whoami', undefined, auth);
    if (check.status === 401) {
      logout('The broker refused your credentials: log in again.');
      throw new LoggedOut();
    }
  }
  const text = await res.text();
  let answer = null;
  try {
    answer = text ? JSON.parse(text) : null;
  } catch {
    answer = null;
  }
  if (!res.ok) {
    const reason = answer && (answer.reason || answer.error);
    throw new Error(`${method} ${decodeURIComponent(path.split('?')[0])}: ${res.status} ${reason || res.statusText}`);
  }
  return answer;
}

// xname is an exchange's name in a path: the default exchange is amq.default.
function xname(name) {
  return name === '' ? 'amq.default' : name;
}

function xtitle(name) {
  return name === '' || name === 'amq.default' ? '(AMQP default)' : name;
}

// --- login ---

async function login(user, password) {
  const bytes = new TextEncoder().encode(user + ':' + password);
  const auth = 'Basic ' + btoa(String.fromCharCode(...bytes));
  const res = await request('GET', 'whoami', undefined, auth);
  if (!res.ok) {
    let reason = res.statusText;
    try {
      reason = (await res.json()).reason || reason;
    } catch {
      // keep the status text
    }
    throw new Error(`Login failed: ${reason}`);
  }
  sessionStorage.setItem(authKey, auth);
  sessionStorage.setItem(whoKey, JSON.stringify(await res.json()));
  samples.length = 0;
  overview = null;
}

function logout(note) {
  sessionStorage.removeItem(authKey);
  sessionStorage.removeItem(whoKey);
  go('#/login', note && new Error(note));
}

function loginPage() {
  const f = form('Log in', [
    input('username', 'Username', { autocomplete: 'username', required: true, autofocus: true }),
    input('password', 'Password', { type: 'password', autocomplete: 'current-password' }),
  ], 'Log in', async els => {
    await login(els.username.value, els.password.value);
    statusLine.hidden = true;
    // A link to a page opened while logged out leads there once logged in.
    go(location.hash && location.hash !== '#/login' ? location.hash : '#/overview');
  });
  main.append(el('div', { class: 'login' }, el('h1', {}, 'amqp-go management'), f));
  f.elements.username.focus();
  return null;
}

// --- overview ---

function sampleOf(o) {
  const ms = o.message_stats || {};
  const qt = o.queue_totals || {};
  const rate = d => (d && typeof d.rate === 'number' ? d.rate : 0);
  return {
    publish: rate(ms.publish_details), deliver: rate(ms.deliver_get_details),
    ready: qt.messages_ready || 0, unacked: qt.messages_unacknowledged || 0,
  };
}

async function takeSample() {
  overview = await api('GET', 'overview');
  samples.push(sampleOf(overview));
  if (samples.length > chartPoints) samples.shift();
}

// niceMax rounds v up to 1, 2, 2.5 or 5 times a power of ten, for the chart's scale.
function niceMax(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].find(m => m * p >= v) * p;
}

// drawChart draws lines (arrays of values, newest last) on canvas, with a scale.
function drawChart(canvas, lines) {
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext('2d');
  g.scale(dpr, dpr);
  const css = getComputedStyle(document.documentElement);
  const color = name => css.getPropertyValue(name).trim();
  const left = 56;
  const right = 8;
  const top = 8;
  const bottom = 20;
  const max = niceMax(Math.max(1, ...lines.flat()));
  g.font = '11px system-ui, sans-serif';
  g.lineWidth = 1;
  g.strokeStyle = color('--line');
  g.fillStyle = color('--muted');
  g.textAlign = 'right';
  g.textBaseline = 'middle';
  for (let i = 0; i <= 4; i++) {
    const y = Math.round(top + (h - top - bottom) * i / 4) + 0.5;
    g.beginPath();
    g.moveTo(left, y);
    g.lineTo(w - right, y);
    g.stroke();
    const v = max * (1 - i / 4);
    g.fillText(v.toLocaleString('en', { maximumFractionDigits: 1 }), left - 4, y);
  }
  g.textBaseline = 'bottom';
  g.fillText('now', w - right, h);
  g.textAlign = 'left';
  g.fillText(`${Math.round(chartPoints * pollMs / 60000)} min ago`, left, h);
  const step = (w - left - right) / (chartPoints - 1);
  const yOf = v => top + (h - top - bottom) * (1 - v / max);
  lines.forEach((values, k) => {
    const x0 = left + (chartPoints - values.length) * step;
    g.strokeStyle = g.fillStyle = color(`--series-${k}`);
    g.lineWidth = 2;
    g.beginPath();
    values.forEach((v, i) => (i ? g.lineTo(x0 + i * step, yOf(v)) : g.moveTo(x0, yOf(v))));
    g.stroke();
    const last = values.length - 1;
    if (last >= 0) {
      g.beginPath();
      g.arc(x0 + last * step, yOf(values[last]), 2.5, 0, 2 * Math.PI);
      g.fill();
    }
  });
}

// chart is a canvas with a title and a legend that gives each series' current value, with
// suffix.
function chart(title, unit, series, suffix) {
  const canvas = el('canvas', { role: 'img', 'aria-label': `${title} in ${unit}, the last five minutes` });
  const legend = el('ul', { class: 'legend' });
  const box = el('section', { class: 'chart' }, el('h2', {}, title, ' ', el('small', {}, unit)), canvas, legend);
  box.draw = () => {
    const lines = series.map(([, key]) => samples.map(s => s[key]));
    legend.replaceChildren(...series.map(([name], k) => {
      const v = lines[k].length ? lines[k][lines[k].length - 1] : 0;
      return el('li', { class: `s${k}` }, `${name}: ${v.toLocaleString('en', { maximumFractionDigits: 1 })}${suffix || ''}`);
    }));
    drawChart(canvas, lines);
  };
  return box;
}

function overviewPage() {
  const rates = chart('Message rates', 'messages per second', [['Publish', 'publish'], ['Deliver', 'deliver']], '/s');
  const queued = chart('Queued messages', 'messages', [['Ready', 'ready'], ['Unacked', 'unacked']]);
  const totals = el('div', { class: 'cards' });
  main.append(el('h1', {}, 'Overview'), el('div', { class: 'cards charts' }, rates, queued), totals);
  return async () => {
    if (!overview) return;
    const o = overview;
    const ot = o.object_totals || {};
    const qt = o.queue_totals || {};
    const ms = o.message_stats || {};
    rates.draw();
    queued.draw();
    totals.replaceChildren(
      el('section', { class: 'card' }, el('h2', {}, 'Queued messages'), facts([
        ['Ready', fmt(qt.messages_ready)], ['Unacked', fmt(qt.messages_unacknowledged)], ['Total', fmt(qt.messages)]])),
      el('section', { class: 'card' }, el('h2', {}, 'Message rates'), facts([
        ['Publish', fmtRate(ms.publish_details).num + '/s'], ['Deliver', fmtRate(ms.deliver_get_details).num + '/s'],
        ['Published', fmt(ms.publish)], ['Delivered', fmt(ms.deliver_get)]])),
      el('section', { class: 'card' }, el('h2', {}, 'Totals'), facts([
        ['Connections', fmt(ot.connections)], ['Channels', fmt(ot.channels)], ['Exchanges', fmt(ot.exchanges)],
        ['Queues', fmt(ot.queues)], ['Consumers', fmt(ot.consumers)]])),
      el('section', { class: 'card' }, el('h2', {}, 'Node'), facts([
        ['Product', `${o.product_name || ''} ${o.product_version || ''}`], ['Node', o.node || ''],
        ['Listeners', (o.listeners || []).map(l => `${l.protocol} ${l.ip_address}`).join(', ')]])));
  };
}

// --- lists ---

// listView is a table of a list path of the API, a page at a time, filtered by name.
function listView(path, caption, columns, row) {
  const state = { page: 1, name: '' };
  const t = table(caption, columns);
  const info = el('span', { class: 'muted' });
  const prev = el('button', { type: 'button', class: 'secondary', onclick: () => { state.page--; refresh().catch(showError); } }, 'Previous page');
  const next = el('button', { type: 'button', class: 'secondary', onclick: () => { state.page++; refresh().catch(showError); } }, 'Next page');
  const filter = el('input', { type: 'search', name: 'filter' });
  filter.addEventListener('input', () => {
    state.name = filter.value;
    state.page = 1;
    refresh().catch(showError);
  });
  const refresh = async () => {
    const q = new URLSearchParams({ page: state.page, page_size: pageSize, name: state.name });
    const r = await api('GET', `${path}?${q}`);
    if (r.page > r.page_count && state.page > 1) {
      state.page = r.page_count;
      return refresh();
    }
    t.fill(r.items.map(row));
    info.textContent = `${r.filtered_count} of ${r.total_count}` + (r.page_count > 1 ? `, page ${r.page} of ${r.page_count}` : '');
    prev.hidden = next.hidden = r.page_count <= 1;
    prev.disabled = r.page <= 1;
    next.disabled = r.page >= r.page_count;
  };
  const node = el('section', {}, el('div', { class: 'actions' }, el('label', {}, 'Filter by name', filter), prev, next, info), t);
  return { node, refresh };
}

function features(o) {
  const f = [];
  if (o.durable) f.push('durable');
  if (o.auto_delete) f.push('auto-delete');
  if (o.exclusive) f.push('exclusive');
  if (o.internal) f.push('internal');
  f.push(...Object.keys(o.arguments || {}));
  if (o.policy) f.push(`policy ${o.policy}`);
  return tags(f);
}

function queuesPage() {
  const list = listView('queues', 'Queues', ['Virtual host', 'Name', 'Features', 'State', 'Ready', 'Unacked', 'Total',
    'Consumers', 'Incoming /s', 'Delivered /s'], q => {
    const ms = q.message_stats || {};
    return [q.vhost, link(q.name, 'queues', q.vhost, q.name), features(q), q.state, q.messages_ready,
      q.messages_unacknowledged, q.messages, q.consumers, fmtRate(ms.publish_details), fmtRate(ms.deliver_get_details)];
  });
  const add = form('Add a queue', [
    vhostChoice(), input('name', 'Name', { required: true }), checkbox('durable', 'Durable', true),
    checkbox('auto_delete', 'Auto-delete', false),
    textarea('arguments', 'Arguments (JSON object)', { placeholder: '{"x-message-ttl": 60000}' }),
  ], 'Add queue', async els => {
    const name = els.name.value;
    await api('PUT', `queues/${enc(els.vhost.value)}/${enc(name)}`, {
      durable: els.durable.checked, auto_delete: els.auto_delete.checked,
      arguments: jsonObject(els.arguments.value, 'Arguments'),
    });
    say(`Queue ${name} added.`);
    els.name.value = '';
    await list.refresh();
  });
  main.append(el('h1', {}, 'Queues'), list.node, add);
  return list.refresh;
}

// messagesView shows messages from a get or a peek.
function messagesView(box, title, list) {
  box.replaceChildren(el('h2', {}, title), ...(list.length ? [] : [el('p', { class: 'muted' }, 'No messages.')]),
    ...list.map((m, i) => {
      const rows = [['Exchange', xtitle(m.exchange)], ['Routing key', m.routing_key], ['Redelivered', m.redelivered ? 'yes' : 'no'],
        ['Properties', JSON.stringify(m.properties)], ['Payload', `${m.payload_bytes} bytes, ${m.payload_encoding}`]];
      return el('table', { class: 'message' }, el('caption', {}, `Message ${i + 1}`),
        el('tbody', {}, rows.map(([k, v]) => el('tr', {}, el('th', { scope: 'row' }, k), el('td', {}, v))),
          el('tr', {}, el('th', { scope: 'row' }, 'Body'), el('td', {}, el('pre', {}, m.payload)))));
    }));
}

function publishForm(vhost, exchange, key) {
  return form('Publish message', [
    input('routing_key', 'Routing key', { value: key || '' }),
    choice('delivery_mode', 'Delivery mode', [['1', '1: non-persistent'], ['2', '2: persistent']], '1'),
    input('content_type', 'Content type', { placeholder: 'text/plain' }),
    textarea('headers', 'Headers (JSON object)', { placeholder: '{"x-trace": "abc"}' }),
    textarea('payload', 'Payload'),
  ], 'Publish', async els => {
    const properties = { delivery_mode: Number(els.delivery_mode.value), headers: jsonObject(els.headers.value, 'Headers') };
    if (els.content_type.value) properties.content_type = els.content_type.value;
    const r = await api('POST', `exchanges/${enc(vhost)}/${enc(xname(exchange))}/publish`, {
      routing_key: els.routing_key.value, payload: els.payload.value, payload_encoding: 'string', properties,
    });
    say(r && r.routed ? 'Message published and routed.' : 'Message published, but not routed to any queue.');
  });
}

// unbindPath is a binding's path in the API.
function unbindPath(b) {
  const dest = b.destination_type === 'queue' ? 'q' : 'e';
  return `bindings/${enc(b.vhost)}/e/${enc(xname(b.source))}/${dest}/${enc(b.destination)}/${enc(b.properties_key)}`;
}

function unbindButton(b, refresh) {
  if (b.source === '') return el('span', { class: 'muted' }, 'implicit');
  return action('Unbind', null, async () => {
    await api('DELETE', unbindPath(b));
    say(`Binding from ${xtitle(b.source)} to ${b.destination} removed.`);
    await refresh();
  });
}

function queuePage(vhost, name) {
  const base = `queues/${enc(vhost)}/${enc(name)}`;
  const details = el('div', { class: 'cards' });
  const consumers = table('Consumers', ['Consumer tag', 'Channel', 'Ack required', 'Prefetch', 'Active']);
  const bindings = table('Bindings', ['From exchange', 'Routing key', 'Arguments', 'Action']);
  const results = el('section', { 'aria-live': 'polite' });
  const refresh = async () => {
    const q = await api('GET', base);
    const ms = q.message_stats || {};
    details.replaceChildren(
      el('section', { class: 'card' }, el('h2', {}, 'Messages'), facts([['Ready', fmt(q.messages_ready)],
        ['Unacked', fmt(q.messages_unacknowledged)], ['Total', fmt(q.messages)], ['Ready bytes', fmt(q.message_bytes)]])),
      el('section', { class: 'card' }, el('h2', {}, 'Rates'), facts([['Incoming', fmtRate(ms.publish_details).num + '/s'],
        ['Delivered', fmtRate(ms.deliver_get_details).num + '/s'], ['Consumers', fmt(q.consumers)]])),
      el('section', { class: 'card' }, el('h2', {}, 'Details'), facts([['Features', features(q)], ['State', q.state],
        ['Arguments', JSON.stringify(q.arguments || {})], ['Idle since', q.idle_since || '']])));
    consumers.fill((q.consumer_details || []).map(c => [c.consumer_tag, (c.channel_details || {}).name || '',
      c.ack_required ? 'yes' : 'no', c.prefetch_count, c.active ? 'yes' : 'no']));
    const bs = await api('GET', `${base}/bindings`);
    bindings.fill(bs.map(b => [b.source === '' ? '(AMQP default)' : link(b.source, 'exchanges', b.vhost, b.source),
      b.routing_key, JSON.stringify(b.arguments || {}), unbindButton(b, refresh)]));
  };
  const bind = form('Add binding from an exchange', [
    input('source', 'Exchange', { required: true }), input('routing_key', 'Routing key'),
    textarea('arguments', 'Arguments (JSON object)'),
  ], 'Bind', async els => {
    await api('POST', `bindings/${enc(vhost)}/e/${enc(els.source.value)}/q/${enc(name)}`,
      { routing_key: els.routing_key.value, arguments: jsonObject(els.arguments.value, 'Arguments') });
    say(`Queue ${name} bound to ${els.source.value}.`);
    await refresh();
  });
  const get = form('Get messages', [
    input('count', 'Messages', { type: 'number', min: 1, max: 10000, value: 1 }),
    choice('ackmode', 'Ack mode', [['ack_requeue_true', 'Nack, requeue (ack_requeue_true)'],
      ['ack_requeue_false', 'Ack: take them (ack_requeue_false)'], ['reject_requeue_true', 'Reject, requeue (reject_requeue_true)'],
      ['reject_requeue_false', 'Reject, no requeue (reject_requeue_false)']], 'ack_requeue_true'),
    choice('encoding', 'Encoding', [['auto', 'Auto: string or base64'], ['base64', 'base64']], 'auto'),
  ], 'Get messages', async els => {
    const list = await api('POST', `${base}/get`, { count: Number(els.count.value), ackmode: els.ackmode.value,
      encoding: els.encoding.value, truncate: 50000 });
    messagesView(results, `Got ${list.length} message${list.length === 1 ? '' : 's'}`, list);
    await refresh();
  });
  const peek = form('Peek at messages', [
    input('count', 'Messages', { type: 'number', min: 1, max: 1000, value: 5 }),
  ], 'Peek', async els => {
    const list = await api('GET', `${base}/peek?count=${enc(els.count.value)}`);
    messagesView(results, `The first ${list.length} ready message${list.length === 1 ? '' : 's'}, left in the queue`, list);
  });
  main.append(
    el('p', {}, link('← Queues', 'queues')),
    el('h1', {}, `Queue ${name} `, el('small', {}, `in virtual host ${vhost}`)),
    details,
    el('div', { class: 'actions' },
      action('Purge', `Purge every ready message of queue ${name}?`, async () => {
        await api('DELETE', `${base}/contents`);
        say(`Queue ${name} purged.`);
        await refresh();
      }),
      action('Delete queue', `Delete queue ${name} and its messages?`, async () => {
        await api('DELETE', base);
        go('#/queues', `Queue ${name} deleted.`);
      })),
    el('div', { class: 'columns' },
      el('div', {}, get, peek, publishForm(vhost, '', name), results),
      el('div', {}, consumers, bindings, bind)));
  return refresh;
}

function exchangesPage() {
  const list = listView('exchanges', 'Exchanges', ['Virtual host', 'Name', 'Type', 'Features'], x =>
    [x.vhost, link(xtitle(x.name), 'exchanges', x.vhost, xname(x.name)), x.type, features(x)]);
  const types = choice('type', 'Type', ['direct', 'fanout', 'topic', 'headers'].map(t => [t, t]), 'direct');
  const add = form('Add an exchange', [
    vhostChoice(), input('name', 'Name', { required: true }), types, checkbox('durable', 'Durable', true),
    checkbox('auto_delete', 'Auto-delete', false), checkbox('internal', 'Internal', false),
    textarea('arguments', 'Arguments (JSON object)', { placeholder: '{"alternate-exchange": "unrouted"}' }),
  ], 'Add exchange', async els => {
    const name = els.name.value;
    await api('PUT', `exchanges/${enc(els.vhost.value)}/${enc(name)}`, {
      type: els.type.value, durable: els.durable.checked, auto_delete: els.auto_delete.checked,
      internal: els.internal.checked, arguments: jsonObject(els.arguments.value, 'Arguments'),
    });
    say(`Exchange ${name} added.`);
    els.name.value = '';
    await list.refresh();
  });
  main.append(el('h1', {}, 'Exchanges'), list.node, add);
  return async () => {
    if (overview) setOptions(types.querySelector('select'), (overview.exchange_types || []).map(t => [t.name, t.name]));
    await list.refresh();
  };
}

function exchangePage(vhost, name) {
  const base = `exchanges/${enc(vhost)}/${enc(xname(name))}`;
  const builtIn = name === 'amq.default' || name.startsWith('amq.');
  const details = el('div', { class: 'cards' });
  const out = table('Bindings from this exchange', ['To', 'Type', 'Routing key', 'Arguments', 'Action']);
  const into = table('Bindings to this exchange', ['From', 'Routing key', 'Arguments', 'Action']);
  const refresh = async () => {
    const x = await api('GET', base);
    details.replaceChildren(el('section', { class: 'card' }, el('h2', {}, 'Details'), facts([['Type', x.type],
      ['Features', features(x)], ['Arguments', JSON.stringify(x.arguments || {})]])));
    const src = await api('GET', `${base}/bindings/source`);
    out.fill(src.map(b => [link(b.destination, b.destination_type === 'queue' ? 'queues' : 'exchanges', b.vhost, b.destination),
      b.destination_type, b.routing_key, JSON.stringify(b.arguments || {}), unbindButton(b, refresh)]));
    const dst = await api('GET', `${base}/bindings/destination`);
    into.fill(dst.map(b => [link(xtitle(b.source), 'exchanges', b.vhost, xname(b.source)), b.routing_key,
      JSON.stringify(b.arguments || {}), unbindButton(b, refresh)]));
  };
  const bind = form('Add binding from this exchange', [
    choice('destination_type', 'To', [['q', 'queue'], ['e', 'exchange']], 'q'),
    input('destination', 'Name', { required: true }), input('routing_key', 'Routing key'),
    textarea('arguments', 'Arguments (JSON object)'),
  ], 'Bind', async els => {
    await api('POST', `bindings/${enc(vhost)}/e/${enc(xname(name))}/${els.destination_type.value}/${enc(els.destination.value)}`,
      { routing_key: els.routing_key.value, arguments: jsonObject(els.arguments.value, 'Arguments') });
    say(`${els.destination.value} bound to exchange ${xtitle(name)}.`);
    await refresh();
  });
  main.append(
    el('p', {}, link('← Exchanges', 'exchanges')),
    el('h1', {}, `Exchange ${xtitle(name)} `, el('small', {}, `in virtual host ${vhost}`)),
    details,
    builtIn ? '' : el('div', { class: 'actions' }, action('Delete exchange', `Delete exchange ${name}?`, async () => {
      await api('DELETE', base);
      go('#/exchanges', `Exchange ${name} deleted.`);
    })),
    el('div', { class: 'columns' },
      el('div', {}, publishForm(vhost, name === 'amq.default' ? '' : name, '')),
      el('div', {}, out, into, name === 'amq.default' ? '' : bind)));
  return refresh;
}

function connectionsPage() {
  let list = null;
  list = listView('connections', 'Connections', ['Name', 'Virtual host', 'User', 'Client', 'Protocol', 'TLS', 'Channels',
    'Connected', 'Action'], c => {
    const cp = c.client_properties || {};
    return [c.name, c.vhost, c.user, [cp.product, cp.version].filter(Boolean).join(' '), c.protocol, c.ssl ? 'yes' : 'no',
      c.channels, fmtTime(c.connected_at), action('Close', `Close connection ${c.name}?`, async () => {
        await api('DELETE', `connections/${enc(c.name)}`);
        say(`Connection ${c.name} closed.`);
        await list.refresh();
      })];
  });
  main.append(el('h1', {}, 'Connections'), list.node);
  return list.refresh;
}

function channelsPage() {
  const list = listView('channels', 'Channels', ['Channel', 'Virtual host', 'User', 'Mode', 'Prefetch', 'Unacked',
    'Unconfirmed', 'Consumers'], c => [c.name, c.vhost, c.user,
    [c.confirm && 'confirm', c.transactional && 'transactional'].filter(Boolean).join(', '),
    c.prefetch_count, c.messages_unacknowledged, c.messages_unconfirmed, c.consumer_count]);
  main.append(el('h1', {}, 'Channels'), list.node);
  return list.refresh;
}

// --- administrators: users, permissions, vhosts ---

function usersPage() {
  let users = null;
  users = listView('users', 'Users', ['Name', 'Tags', 'Action'], u => [u.name, tags(u.tags || []),
    u.name === who().name ? el('span', { class: 'muted' }, 'you') : action('Delete', `Delete user ${u.name}?`, async () => {
      await api('DELETE', `users/${enc(u.name)}`);
      say(`User ${u.name} deleted.`);
      await refresh();
    })]);
  const perms = table('Permissions', ['User', 'Virtual host', 'Configure', 'Write', 'Read', 'Action']);
  const refresh = async () => {
    await users.refresh();
    const ps = await api('GET', 'permissions');
    perms.fill(ps.map(p => [p.user, p.vhost, p.configure, p.write, p.read, action('Clear', null, async () => {
      await api('DELETE', `permissions/${enc(p.vhost)}/${enc(p.user)}`);
      say(`Permissions of ${p.user} on ${p.vhost} cleared.`);
      await refresh();
    })]));
  };
  const add = form('Add a user', [
    input('name', 'Name', { required: true, autocomplete: 'off' }),
    input('password', 'Password', { type: 'password', autocomplete: 'new-password' }),
    input('tags', 'Tags, comma-separated', { placeholder: 'management, monitoring, policymaker, administrator' }),
  ], 'Add user', async els => {
    const name = els.name.value;
    await api('PUT', `users/${enc(name)}`, { password: els.password.value, tags: els.tags.value });
    say(`User ${name} added. Give them permissions on a virtual host to let them in.`);
    els.name.value = els.password.value = els.tags.value = '';
    await refresh();
  });
  const grant = form('Set permissions', [
    input('user', 'User', { required: true }), vhostChoice(),
    input('configure', 'Configure regexp', { value: '.*' }), input('write', 'Write regexp', { value: '.*' }),
    input('read', 'Read regexp', { value: '.*' }),
  ], 'Set permissions', async els => {
    await api('PUT', `permissions/${enc(els.vhost.value)}/${enc(els.user.value)}`,
      { configure: els.configure.value, write: els.write.value, read: els.read.value });
    say(`Permissions of ${els.user.value} on ${els.vhost.value} set.`);
    await refresh();
  });
  main.append(el('h1', {}, 'Users'), users.node, add, perms, grant);
  return refresh;
}

function vhostsPage() {
  let list = null;
  list = listView('vhosts', 'Virtual hosts', ['Name', 'Ready', 'Unacked', 'Total', 'Action'], v => [v.name,
    v.messages_ready, v.messages_unacknowledged, v.messages,
    action('Delete', `Delete virtual host ${v.name} with all its queues and messages?`, async () => {
      await api('DELETE', `vhosts/${enc(v.name)}`);
      say(`Virtual host ${v.name} deleted.`);
      await list.refresh();
    })]);
  const add = form('Add a virtual host', [input('name', 'Name', { required: true })], 'Add virtual host', async els => {
    const name = els.name.value;
    await api('PUT', `vhosts/${enc(name)}`, {});
    say(`Virtual host ${name} added. Give users permissions on it in Users.`);
    els.name.value = '';
    await list.refresh();
  });
  main.append(el('h1', {}, 'Virtual hosts'), list.node, add);
  return list.refresh;
}

function adminOnly(render) {
  return (...args) => {
    if (isAdmin()) return render(...args);
    main.append(el('h1', {}, 'Not allowed'), el('p', {}, 'Only users tagged administrator manage users and virtual hosts.'));
    return null;
  };
}

// --- routing ---

const pages = {
  overview: overviewPage,
  connections: connectionsPage,
  channels: channelsPage,
  exchanges: (vhost, name) => (name === undefined ? exchangesPage() : exchangePage(vhost, name)),
  queues: (vhost, name) => (name === undefined ? queuesPage() : queuePage(vhost, name)),
  users: adminOnly(usersPage),
  vhosts: adminOnly(vhostsPage),
};

async function refreshPage(gen) {
  if (!page.refresh) return;
  try {
    await page.refresh();
  } catch (e) {
    if (gen === page.gen) showError(e);
  }
}

// route shows the page the location's hash names.
async function route() {
  const gen = ++page.gen;
  page.refresh = null;
  main.replaceChildren();
  const loggedIn = !!authHeader();
  document.getElementById('nav').hidden = !loggedIn;
  document.getElementById('who').hidden = !loggedIn;
  if (!loggedIn) {
    loginPage();
    return;
  }
  const u = who();
  document.body.classList.toggle('is-admin', isAdmin());
  document.getElementById('user').textContent = `${u.name} (${u.tags.join(', ') || 'no tags'})`;
  const [name, ...args] = location.hash.replace(/^#\/?/, '').split('/').map(s => {
    try {
      return decodeURIComponent(s);
    } catch {
      return s;
    }
  });
  const render = Object.hasOwn(pages, name) ? pages[name] : overviewPage;
  for (const a of document.querySelectorAll('nav a')) {
    if (a.getAttribute('href') === `#/${Object.hasOwn(pages, name) ? name : 'overview'}`) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  page.refresh = render(...args);
  try {
    if (!overview) await takeSample();
  } catch (e) {
    showError(e);
  }
  if (gen === page.gen) await refreshPage(gen);
}

// poll samples the overview and refreshes the page on show, every pollMs.
async function poll() {
  if (authHeader()) {
    const gen = page.gen;
    try {
      await takeSample();
    } catch (e) {
      if (gen === page.gen) showError(e);
    }
    if (gen === page.gen) await refreshPage(gen);
  }
  setTimeout(poll, pollMs);
}

document.getElementById('logout').addEventListener('click', () => logout());
window.addEventListener('hashchange', () => {
  statusLine.hidden = true;
  route();
  showNote(pendingNote);
  pendingNote = null;
});
window.addEventListener('resize', () => {
  if (page.refresh && (location.hash === '' || location.hash === '#/overview')) page.refresh();
});
route();
setTimeout(poll, pollMs);
