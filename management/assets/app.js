// Ferry's dashboard: plain JavaScript, no framework, no build step. It reads the management API
// (docs/management.md) with HTTP Basic credentials kept in sessionStorage.
//
// Everything put into the page from the API goes through textContent (el() below): queue
// names, client ids and connection names are chosen by clients, so never as markup.
'use strict';

(() => {
  const AUTH_KEY = 'ferry.authorization';
  const USER_KEY = 'ferry.user';
  const REFRESH_KEY = 'ferry.refresh';
  const WINDOW_KEY = 'ferry.window';
  // The charts keep the last hour (the longest window shown), at most this many points
  // whatever the refresh interval.
  const HISTORY_MS = 60 * 60 * 1000;
  const MAX_POINTS = 3600;
  const REQUEST_TIMEOUT_MS = 15000;
  const PAGE_SIZE = 100;
  // Longest text shown in a cell of the bridges' and sessions' generic tables.
  const MAX_CELL = 300;
  const TABS = ['overview', 'queues', 'connections', 'sessions', 'bridges'];

  const $ = (id) => document.getElementById(id);

  // ----- DOM ------------------------------------------------------------------------------

  /** An element with properties and children; strings become text nodes. */
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = String(v);
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function replace(container, ...children) {
    container.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  }

  function table(headers, rows, empty) {
    if (rows.length === 0) return el('p', { class: 'muted empty', text: empty });
    return el('table', { class: 'list' },
      el('thead', null, el('tr', null, headers.map((h) => el('th', { text: h })))),
      el('tbody', null, rows));
  }

  function setStatus(text, isError) {
    const s = $('status');
    s.textContent = text;
    s.classList.toggle('error', Boolean(isError));
  }

  // ----- numbers ---------------------------------------------------------------------------

  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : 0);

  function count(v) {
    return num(v).toLocaleString('en-US');
  }

  function rate(v) {
    const r = num(v);
    return (r >= 100 ? r.toFixed(0) : r.toFixed(1)) + '/s';
  }

  function bytes(v) {
    let b = num(v);
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) {
      b /= 1024;
      i += 1;
    }
    return (i === 0 ? String(b) : b.toFixed(1)) + ' ' + units[i];
  }

  function since(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0) return '';
    const d = new Date(ms);
    return Number.isNaN(d.getTime()) ? '' : d.toLocaleString();
  }

  /** `obj.a.b` or undefined, for optional fields. */
  function path(obj, dotted) {
    return dotted.split('.').reduce((o, k) => (o !== null && typeof o === 'object' ? o[k] : undefined), obj);
  }

  function cellText(v) {
    if (v === null || v === undefined) return '';
    const s = typeof v === 'object' ? JSON.stringify(v) : String(v);
    return s.length > MAX_CELL ? s.slice(0, MAX_CELL) + '…' : s;
  }

  // ----- the API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, error, reason) {
      super(reason || error || 'HTTP ' + status);
      this.status = status;
      this.error = error;
    }
    /** The credentials are not (or no longer) accepted: back to the login form. */
    get loginFailed() {
      return this.status === 401 && this.error !== 'not_authorised';
    }
  }

  function basic(user, password) {
    const utf8 = new TextEncoder().encode(user + ':' + password);
    let binary = '';
    for (const b of utf8) binary += String.fromCharCode(b);
    return 'Basic ' + btoa(binary);
  }

  async function api(method, url, options) {
    const opts = options || {};
    const headers = {
      Accept: 'application/json',
      // Asks the API to answer 401 without the Basic challenge, so that the browser does not
      // open its own login dialog over this page's form.
      'X-Requested-With': 'XMLHttpRequest',
      ...(opts.headers || {}),
    };
    const authorization = opts.authorization || sessionStorage.getItem(AUTH_KEY);
    if (authorization) headers.Authorization = authorization;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(url, { method, headers, credentials: 'omit', cache: 'no-store', signal: controller.signal });
    } catch (e) {
      throw new ApiError(0, 'network', e.name === 'AbortError' ? 'the broker did not answer in time' : 'the broker cannot be reached');
    } finally {
      clearTimeout(timer);
    }
    // The body is always read to its end (an unread one is cancelled, which the browser
    // reports as a failed request).
    let body = null;
    try {
      const text = await response.text();
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const error = body && typeof body.error === 'string' ? body.error : '';
      const reason = body && typeof body.reason === 'string' ? body.reason : response.statusText;
      throw new ApiError(response.status, error, reason);
    }
    return body;
  }

  /** A list endpoint's items, from RabbitMQ's page object or a plain array. */
  function pageOf(body) {
    if (Array.isArray(body)) {
      return { items: body, page: 1, page_count: 1, filtered_count: body.length, total_count: body.length };
    }
    if (body && Array.isArray(body.items)) return body;
    return { items: [], page: 1, page_count: 1, filtered_count: 0, total_count: 0 };
  }

  // ----- charts ----------------------------------------------------------------------------

  /** A rolling line chart on a canvas, drawn here (no library). */
  class Chart {
    constructor(canvas, legend, series, format) {
      this.canvas = canvas;
      this.series = series; // [{ key, label, color }]
      this.format = format;
      this.points = []; // [{ t, values: { key: number } }]
      this.legendValues = {};
      replace(legend, series.map((s) => {
        const swatch = el('span', { class: 'swatch' });
        swatch.style.backgroundColor = s.color;
        const value = el('span', { class: 'value', text: '–' });
        this.legendValues[s.key] = value;
        return el('li', null, swatch, s.label + ' ', value);
      }));
    }

    push(t, values) {
      this.points.push({ t, values });
      const oldest = t - HISTORY_MS;
      while (this.points.length > MAX_POINTS || (this.points.length > 0 && this.points[0].t < oldest)) {
        this.points.shift();
      }
      for (const s of this.series) {
        this.legendValues[s.key].textContent = this.format(values[s.key]);
      }
      this.draw();
    }

    clear() {
      this.points = [];
      this.draw();
    }

    draw() {
      const canvas = this.canvas;
      const ratio = window.devicePixelRatio || 1;
      const width = Math.max(canvas.clientWidth, 200);
      const height = Math.max(canvas.clientHeight, 120);
      if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
        canvas.width = Math.round(width * ratio);
        canvas.height = Math.round(height * ratio);
      }
      const ctx = canvas.getContext('2d');
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);

      const span = chartWindow();
      const now = this.points.length ? this.points[this.points.length - 1].t : Date.now();
      const shown = this.points.filter((p) => p.t >= now - span);
      let max = 0;
      for (const p of shown) {
        for (const s of this.series) max = Math.max(max, num(p.values[s.key]));
      }
      const top = niceCeiling(max);
      // 1 and 5 times a power of ten divide into fifths, 2 into quarters: round grid values.
      const divisions = String(top)[0] === '2' ? 4 : 5;
      const left = 56;
      const right = 12;
      const above = 8;
      const below = 20;
      const plotW = width - left - right;
      const plotH = height - above - below;
      const x = (t) => left + ((t - (now - span)) / span) * plotW;
      const y = (v) => above + plotH - (num(v) / top) * plotH;

      ctx.font = '11px system-ui, sans-serif';
      ctx.lineWidth = 1;
      ctx.strokeStyle = '#d8dde3';
      ctx.fillStyle = '#5b6570';
      ctx.textAlign = 'right';
      ctx.textBaseline = 'middle';
      for (let i = 0; i <= divisions; i += 1) {
        const v = (top * i) / divisions;
        const yy = Math.round(y(v)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(left, yy);
        ctx.lineTo(width - right, yy);
        ctx.stroke();
        ctx.fillText(shortNumber(v), left - 6, yy);
      }
      ctx.textBaseline = 'top';
      const seconds = span / 1000;
      const tick = seconds <= 60 ? 10 : seconds <= 600 ? 120 : 600;
      for (let ago = seconds; ago >= 0; ago -= tick) {
        ctx.textAlign = ago === seconds ? 'left' : ago === 0 ? 'right' : 'center';
        const label = ago === 0 ? 'now' : seconds <= 60 ? '-' + ago + ' s' : '-' + ago / 60 + ' min';
        ctx.fillText(label, x(now - ago * 1000), height - below + 4);
      }

      ctx.lineWidth = 2;
      ctx.lineJoin = 'round';
      ctx.save();
      ctx.beginPath();
      ctx.rect(left, 0, plotW, height);
      ctx.clip();
      for (const s of this.series) {
        ctx.strokeStyle = s.color;
        ctx.beginPath();
        this.points.forEach((p, i) => {
          const px = x(p.t);
          const py = y(p.values[s.key]);
          if (i === 0) ctx.moveTo(px, py);
          else ctx.lineTo(px, py);
        });
        if (this.points.length === 1) {
          ctx.arc(x(now), y(this.points[0].values[s.key]), 1.5, 0, 2 * Math.PI);
        }
        ctx.stroke();
      }
      ctx.restore();

      // What is drawn, for people reading the page with tools (and the browser test).
      const last = this.points.length ? this.points[this.points.length - 1].values : {};
      canvas.dataset.points = String(this.points.length);
      canvas.dataset.max = String(max);
      for (const s of this.series) canvas.dataset[s.key] = String(num(last[s.key]));
      canvas.setAttribute('aria-label', this.series.map((s) => s.label + ' ' + this.format(last[s.key])).join(', '));
    }
  }

  /** The charts' time span, in ms, as chosen above them. */
  function chartWindow() {
    const seconds = Number($('chart-window').value);
    return (seconds > 0 ? seconds : 60) * 1000;
  }

  /** 1, 2 or 5 times a power of ten, at least `v` (and at least 1). */
  function niceCeiling(v) {
    if (!(v > 1)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) {
      if (m * p >= v) return m * p;
    }
    return 10 * p;
  }

  function shortNumber(v) {
    if (v >= 1e9) return (v / 1e9).toFixed(v % 1e9 ? 1 : 0) + 'G';
    if (v >= 1e6) return (v / 1e6).toFixed(v % 1e6 ? 1 : 0) + 'M';
    if (v >= 1e3) return (v / 1e3).toFixed(v % 1e3 ? 1 : 0) + 'k';
    return String(Math.round(v * 100) / 100);
  }

  // ----- state -----------------------------------------------------------------------------

  const state = {
    user: null,
    admin: false,
    tab: 'overview',
    timer: null,
    refreshing: false,
    // `seq` numbers the requests of a list, so that an older answer arriving after a newer
    // one (a filter typed during a refresh) is not shown.
    queues: { page: 1, name: '', regex: false, seq: 0 },
    // `armed`: the connection whose Close button awaits its confirming click, until `armedUntil`
    // (kept here, as the table is redrawn at every refresh).
    connections: { page: 1, name: '', seq: 0, armed: null, armedUntil: 0 },
  };

  /** How long a first click on Close waits for the confirming one. */
  const CONFIRM_MS = 10000;

  let rates = null;
  let queued = null;

  // ----- login -----------------------------------------------------------------------------

  function showLogin(message) {
    stopTimer();
    sessionStorage.removeItem(AUTH_KEY);
    sessionStorage.removeItem(USER_KEY);
    state.user = null;
    $('tabs').hidden = true;
    $('account').hidden = true;
    for (const t of TABS) $(t).hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    $('login-password').value = '';
    if (rates) rates.clear();
    if (queued) queued.clear();
    $('login-user').focus();
  }

  async function login(event) {
    event.preventDefault();
    const user = $('login-user').value;
    const authorization = basic(user, $('login-password').value);
    $('login-submit').disabled = true;
    $('login-error').textContent = '';
    try {
      const me = await api('GET', '/api/whoami', { authorization });
      sessionStorage.setItem(AUTH_KEY, authorization);
      sessionStorage.setItem(USER_KEY, user);
      enter(me);
    } catch (e) {
      $('login-error').textContent = e.status === 401 ? 'Login failed: ' + e.message : e.message;
    } finally {
      $('login-submit').disabled = false;
      $('login-password').value = '';
    }
  }

  function enter(me) {
    state.user = typeof me.name === 'string' ? me.name : sessionStorage.getItem(USER_KEY) || '';
    const tags = Array.isArray(me.tags) ? me.tags.map(String) : [];
    state.admin = tags.includes('administrator');
    $('who').textContent = state.user + (tags.length ? ' (' + tags.join(', ') + ')' : '');
    $('login').hidden = true;
    $('tabs').hidden = false;
    $('account').hidden = false;
    document.body.dataset.user = state.user;
    showTab(tabFromHash());
    restartTimer();
  }

  function logout() {
    showLogin('');
  }

  // ----- refreshing ------------------------------------------------------------------------

  function stopTimer() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
  }

  function restartTimer() {
    stopTimer();
    refresh();
  }

  function schedule() {
    stopTimer();
    const seconds = Number($('refresh').value);
    if (state.user !== null && seconds > 0) state.timer = setTimeout(refresh, seconds * 1000);
  }

  async function refresh() {
    if (state.user === null) return;
    if (state.refreshing) {
      schedule();
      return;
    }
    state.refreshing = true;
    try {
      // The overview feeds the charts on every tab, so their history has no gaps.
      await Promise.all([refreshOverview(), state.tab === 'overview' ? null : refreshTab(state.tab)]);
      setStatus('Updated ' + new Date().toLocaleTimeString(), false);
    } catch (e) {
      if (e instanceof ApiError && e.loginFailed) {
        showLogin('Logged out: ' + e.message);
        return;
      }
      setStatus(e.message, true);
    } finally {
      state.refreshing = false;
    }
    schedule();
  }

  // ----- overview --------------------------------------------------------------------------

  async function refreshOverview() {
    const o = await api('GET', '/api/overview');
    const t = Date.now();
    $('product').textContent = [o.product_name, o.product_version, o.node].filter((s) => typeof s === 'string').join(' · ');
    rates.push(t, {
      publish: num(path(o, 'message_stats.publish_details.rate')),
      deliver: num(path(o, 'message_stats.deliver_get_details.rate')),
    });
    queued.push(t, {
      ready: num(path(o, 'queue_totals.messages_ready')),
      unacked: num(path(o, 'queue_totals.messages_unacknowledged')),
    });
    const dl = (pairs) => pairs.flatMap(([label, v]) => [el('dt', { text: label }), el('dd', { text: count(v) })]);
    replace($('queue-totals'), dl([
      ['Total', path(o, 'queue_totals.messages')],
      ['Ready', path(o, 'queue_totals.messages_ready')],
      ['Unacknowledged', path(o, 'queue_totals.messages_unacknowledged')],
    ]));
    replace($('object-totals'), dl([
      ['Connections', path(o, 'object_totals.connections')],
      ['Channels', path(o, 'object_totals.channels')],
      ['Exchanges', path(o, 'object_totals.exchanges')],
      ['Queues', path(o, 'object_totals.queues')],
      ['Consumers', path(o, 'object_totals.consumers')],
    ]));
    const listeners = Array.isArray(o.listeners) ? o.listeners : [];
    if (listeners.length === 0) replace($('listeners'), el('tr', null, el('td', { class: 'muted', text: 'none listed' })));
    else replace($('listeners'), listeners.map((l) => el('tr', null,
      el('td', { text: cellText(l.protocol) }),
      el('td', { text: cellText(l.ip_address) + ':' + cellText(l.port) }))));
  }

  // ----- tabs ------------------------------------------------------------------------------

  function tabFromHash() {
    const name = location.hash.replace(/^#/, '');
    return TABS.includes(name) ? name : 'overview';
  }

  function showTab(name) {
    state.tab = name;
    for (const t of TABS) $(t).hidden = t !== name;
    for (const a of document.querySelectorAll('#tabs a')) {
      a.classList.toggle('active', a.dataset.tab === name);
      if (a.dataset.tab === name) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    if (name === 'overview') {
      rates.draw();
      queued.draw();
    } else {
      refreshTab(name).catch((e) => {
        if (e instanceof ApiError && e.loginFailed) showLogin('Logged out: ' + e.message);
        else setStatus(e.message, true);
      });
    }
  }

  function refreshTab(name) {
    switch (name) {
      case 'queues': return refreshQueues();
      case 'connections': return refreshConnections();
      case 'sessions': return refreshSessions();
      case 'bridges': return refreshBridges();
      default: return Promise.resolve();
    }
  }

  /** Shows an endpoint's failure in its panel; a 404 means this broker does not have it. */
  function showFailure(container, url, e) {
    if (e instanceof ApiError && e.loginFailed) throw e;
    const message = e instanceof ApiError && e.status === 404
      ? 'Not available: this broker does not serve ' + url + ' (404).'
      : 'Could not load ' + url + ': ' + e.message;
    container.dataset.state = e instanceof ApiError && e.status === 404 ? 'unavailable' : 'error';
    replace(container, el('p', { class: e.status === 404 ? 'muted unavailable' : 'error', text: message }));
  }

  function pager(prefix, page, onChange) {
    const pages = Math.max(1, num(page.page_count));
    const current = Math.min(Math.max(1, num(page.page)), pages);
    $(prefix + '-page').textContent = 'page ' + current + ' of ' + pages;
    $(prefix + '-prev').disabled = current <= 1;
    $(prefix + '-next').disabled = current >= pages;
    $(prefix + '-prev').onclick = () => onChange(current - 1);
    $(prefix + '-next').onclick = () => onChange(current + 1);
  }

  // ----- queues ----------------------------------------------------------------------------

  async function refreshQueues() {
    const q = state.queues;
    const params = new URLSearchParams({ page: String(q.page), page_size: String(PAGE_SIZE) });
    if (q.name) {
      params.set('name', q.name);
      if (q.regex) params.set('use_regex', 'true');
    }
    const url = '/api/queues?' + params;
    const container = $('queue-list');
    const seq = ++q.seq;
    let page;
    try {
      page = pageOf(await api('GET', url));
      if (seq !== q.seq) return;
    } catch (e) {
      if (seq !== q.seq) return;
      if (e instanceof ApiError && e.status === 400) {
        replace(container, el('p', { class: 'error', text: e.message }));
        container.dataset.state = 'error';
        return;
      }
      showFailure(container, '/api/queues', e);
      return;
    }
    if (num(page.page_count) > 0 && q.page > num(page.page_count)) {
      q.page = num(page.page_count);
      return refreshQueues();
    }
    $('queue-count').textContent = count(page.filtered_count) + ' of ' + count(page.total_count) + ' queues';
    pager('queue', page, (p) => {
      q.page = p;
      refreshQueues().catch((e) => setStatus(e.message, true));
    });
    const rows = page.items.map((item) => el('tr', { dataset: { queue: cellText(item.name) } },
      el('td', { class: 'name', text: cellText(item.name) }),
      el('td', { text: cellText(item.vhost) }),
      el('td', { text: features(item) }),
      el('td', { text: cellText(item.state) }),
      el('td', { class: 'n', text: count(item.messages_ready) }),
      el('td', { class: 'n', text: count(item.messages_unacknowledged) }),
      el('td', { class: 'n', text: count(item.messages) }),
      el('td', { class: 'n', text: count(item.consumers) }),
      el('td', { class: 'n', text: rate(path(item, 'message_stats.publish_details.rate')) }),
      el('td', { class: 'n', text: rate(path(item, 'message_stats.deliver_get_details.rate')) })));
    replace(container, table(
      ['Name', 'Vhost', 'Features', 'State', 'Ready', 'Unacked', 'Total', 'Consumers', 'Incoming', 'Delivered'],
      rows, q.name ? 'No queue matches the filter.' : 'No queues.'));
    container.dataset.state = 'loaded';
  }

  function features(q) {
    const f = [];
    if (q.durable) f.push('durable');
    if (q.auto_delete) f.push('auto-delete');
    if (q.exclusive) f.push('exclusive');
    const args = q.arguments && typeof q.arguments === 'object' ? Object.keys(q.arguments) : [];
    return f.concat(args).join(', ');
  }

  // ----- connections -----------------------------------------------------------------------

  async function refreshConnections() {
    const c = state.connections;
    const params = new URLSearchParams({ page: String(c.page), page_size: String(PAGE_SIZE) });
    if (c.name) params.set('name', c.name);
    const container = $('connection-list');
    const seq = ++c.seq;
    let page;
    try {
      page = pageOf(await api('GET', '/api/connections?' + params));
      if (seq !== c.seq) return;
    } catch (e) {
      if (seq !== c.seq) return;
      showFailure(container, '/api/connections', e);
      return;
    }
    if (num(page.page_count) > 0 && c.page > num(page.page_count)) {
      c.page = num(page.page_count);
      return refreshConnections();
    }
    $('connection-count').textContent = count(page.filtered_count) + ' of ' + count(page.total_count) + ' connections';
    pager('connection', page, (p) => {
      c.page = p;
      refreshConnections().catch((e) => setStatus(e.message, true));
    });
    const headers = ['Name', 'Protocol', 'User', 'Vhost', 'Client', 'TLS', 'Channels', 'Received', 'Sent', 'Connected since'];
    if (state.admin) headers.push('');
    const rows = page.items.map((conn) => {
      const client = path(conn, 'client_properties.connection_name') || path(conn, 'ferry.client_id') || path(conn, 'client_properties.client_id');
      const cells = [
        el('td', { class: 'name', text: cellText(conn.name) }),
        el('td', { text: cellText(conn.protocol) }),
        el('td', { text: cellText(conn.user) }),
        el('td', { text: cellText(conn.vhost) }),
        el('td', { text: cellText(client) }),
        el('td', { text: conn.ssl ? 'yes' : 'no' }),
        el('td', { class: 'n', text: count(conn.channels) }),
        el('td', { class: 'n', text: bytes(conn.recv_oct) }),
        el('td', { class: 'n', text: bytes(conn.send_oct) }),
        el('td', { text: since(conn.connected_at) }),
      ];
      if (state.admin && typeof conn.name === 'string') cells.push(el('td', null, closeButton(conn.name)));
      return el('tr', { dataset: { connection: cellText(conn.name) } }, cells);
    });
    replace(container, table(headers, rows, c.name ? 'No connection matches the filter.' : 'No connections.'));
    container.dataset.state = 'loaded';
  }

  /** Close, then a second click within CONFIRM_MS to confirm (no modal dialog). */
  function closeButton(name) {
    const c = state.connections;
    const armed = () => c.armed === name && Date.now() < c.armedUntil;
    const button = el('button', { type: 'button', class: 'danger' });
    const show = () => {
      button.textContent = armed() ? 'Confirm close' : 'Close';
      button.classList.toggle('armed', armed());
    };
    show();
    button.addEventListener('click', async () => {
      if (!armed()) {
        c.armed = name;
        c.armedUntil = Date.now() + CONFIRM_MS;
        show();
        return;
      }
      c.armed = null;
      button.disabled = true;
      try {
        await api('DELETE', '/api/connections/' + encodeURIComponent(name), {
          headers: { 'X-Reason': 'Closed via the Ferry dashboard' },
        });
        setStatus('Closed ' + name, false);
      } catch (e) {
        if (e instanceof ApiError && e.loginFailed) {
          showLogin('Logged out: ' + e.message);
          return;
        }
        setStatus('Could not close ' + name + ': ' + e.message, true);
      }
      await refreshConnections().catch((e) => setStatus(e.message, true));
    });
    return button;
  }

  // ----- MQTT sessions ---------------------------------------------------------------------

  async function refreshSessions() {
    const url = '/api/mqtt/sessions';
    const container = $('session-list');
    let page;
    try {
      page = pageOf(await api('GET', url + '?' + new URLSearchParams({ page: '1', page_size: String(PAGE_SIZE) })));
    } catch (e) {
      $('session-count').textContent = '';
      showFailure(container, url, e);
      return;
    }
    $('session-count').textContent = count(page.filtered_count) + ' of ' + count(page.total_count) + ' sessions'
      + (num(page.page_count) > 1 ? ' (the first ' + PAGE_SIZE + ' shown)' : '');
    const rows = page.items.map((s) => {
      const subs = Array.isArray(s.subscriptions) ? s.subscriptions : [];
      return el('tr', null,
        el('td', { class: 'name', text: cellText(s.client_id) }),
        el('td', { text: cellText(s.vhost) }),
        el('td', { text: cellText(s.user) }),
        el('td', { text: s.connected ? 'yes' : 'no' }),
        el('td', null, subs.slice(0, 20).map((sub) => el('div', { text: cellText(sub && sub.filter) + ' (QoS ' + cellText(sub && sub.qos) + ')' })),
          subs.length > 20 ? el('div', { class: 'muted', text: '… ' + (subs.length - 20) + ' more' }) : null),
        el('td', { class: 'n', text: count(s.messages) }));
    });
    replace(container, table(['Client id', 'Vhost', 'User', 'Connected', 'Subscriptions', 'Queued messages'], rows, 'No MQTT sessions.'));
    container.dataset.state = 'loaded';
  }

  // ----- bridges and shovels ---------------------------------------------------------------

  async function refreshBridges() {
    await Promise.all([
      genericList('/api/bridges', $('bridge-list'), ['name', 'state', 'status', 'address', 'connected', 'queued', 'in_flight'], 'No bridges.'),
      genericList('/api/shovels', $('shovel-list'), ['name', 'vhost', 'type', 'state', 'src_uri', 'dest_uri', 'timestamp', 'reason'], 'No shovels.'),
    ]);
  }

  /** A list whose shape is known only in part: the `preferred` keys first, then the others. */
  async function genericList(url, container, preferred, empty) {
    let page;
    try {
      page = pageOf(await api('GET', url));
    } catch (e) {
      showFailure(container, url, e);
      return;
    }
    const items = page.items.slice(0, 500).filter((i) => i !== null && typeof i === 'object');
    const keys = [];
    for (const k of preferred) if (items.some((i) => k in i)) keys.push(k);
    for (const i of items) {
      for (const k of Object.keys(i)) if (!keys.includes(k) && keys.length < 16) keys.push(k);
    }
    const rows = items.map((i) => el('tr', null, keys.map((k) => el('td', { text: cellText(i[k]) }))));
    replace(container, table(keys, rows, empty));
    container.dataset.state = 'loaded';
  }

  // ----- start -----------------------------------------------------------------------------

  function start() {
    rates = new Chart($('rates-chart'), $('rates-legend'), [
      { key: 'publish', label: 'Publish', color: '#1f77b4' },
      { key: 'deliver', label: 'Deliver', color: '#e8710a' },
    ], rate);
    queued = new Chart($('queued-chart'), $('queued-legend'), [
      { key: 'ready', label: 'Ready', color: '#2ca02c' },
      { key: 'unacked', label: 'Unacked', color: '#9467bd' },
    ], count);

    const saved = localStorage.getItem(REFRESH_KEY);
    if (saved !== null && [...$('refresh').options].some((o) => o.value === saved)) $('refresh').value = saved;
    $('refresh').addEventListener('change', () => {
      localStorage.setItem(REFRESH_KEY, $('refresh').value);
      restartTimer();
    });
    const savedWindow = localStorage.getItem(WINDOW_KEY);
    if (savedWindow !== null && [...$('chart-window').options].some((o) => o.value === savedWindow)) {
      $('chart-window').value = savedWindow;
    }
    $('chart-window').addEventListener('change', () => {
      localStorage.setItem(WINDOW_KEY, $('chart-window').value);
      rates.draw();
      queued.draw();
    });
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', logout);
    window.addEventListener('hashchange', () => {
      if (state.user !== null) showTab(tabFromHash());
    });
    window.addEventListener('resize', () => {
      rates.draw();
      queued.draw();
    });

    $('queue-filter').addEventListener('submit', (e) => e.preventDefault());
    let typing = null;
    const onFilter = (apply) => () => {
      clearTimeout(typing);
      typing = setTimeout(() => {
        apply();
        refreshTab(state.tab).catch((e) => setStatus(e.message, true));
      }, 250);
    };
    $('queue-name').addEventListener('input', onFilter(() => {
      state.queues.name = $('queue-name').value;
      state.queues.page = 1;
    }));
    $('queue-regex').addEventListener('change', onFilter(() => {
      state.queues.regex = $('queue-regex').checked;
      state.queues.page = 1;
    }));
    $('connection-name').addEventListener('input', onFilter(() => {
      state.connections.name = $('connection-name').value;
      state.connections.page = 1;
    }));

    if (sessionStorage.getItem(AUTH_KEY)) {
      api('GET', '/api/whoami').then(enter, (e) => {
        showLogin(e instanceof ApiError && e.loginFailed ? '' : e.message);
      });
    } else {
      showLogin('');
    }
  }

  start();
})();
