/*! livecopy tracker: impressions and clicks of personalized copy -> POST /v1/events. No dependencies.
 *
 * <script src="https://LIVECOPY/v1/tracker.js" data-key="PUBLISHABLE_KEY" data-token="SHOPPER_TOKEN" async></script>
 * <p data-livecopy-copy="COPY_ID" data-livecopy-product="PRODUCT_ID" data-livecopy-impression="IMPRESSION_ID">...</p>
 *
 * An impression is recorded once an element is at least half visible for one continuous second (page
 * visible), a click on the first click in it; one of each per impression id (data-livecopy-impression,
 * made here when absent). Events wait in sessionStorage, each with its own event id, until the
 * collector answered for them: sent in batches (fetch, keepalive), with navigator.sendBeacon when
 * the page is hidden or left; a batch that failed or whose answer was never seen is sent again with
 * the same ids, and the collector writes an event id once.
 */
(function (root, factory) {
  'use strict';
  if (typeof module === 'object' && module.exports) {
    module.exports = factory;
  } else {
    root.livecopy = factory(root);
  }
})(typeof self !== 'undefined' ? self : this, function (win, opts) {
  'use strict';
  opts = opts || {};
  var doc = win.document;
  var script = opts.script || doc.currentScript || doc.querySelector('script[data-key][src*="tracker.js"]');
  var data = (script && script.dataset) || {};
  var cfg = {
    key: opts.key || data.key || '',
    token: opts.token || data.token || '',
    endpoint: opts.endpoint || data.endpoint ||
      (script && script.src ? script.src.replace(/\/v1\/tracker\.js.*$/, '') : '') + '/v1/events',
    flushMs: +(opts.flushMs || data.flushMs || 3000),
    maxBatch: +(opts.maxBatch || data.maxBatch || 20),
    dwellMs: +(opts.dwellMs || data.dwellMs || 1000),
    beaconRetryMs: +(opts.beaconRetryMs || data.beaconRetryMs || 10000)
  };
  var now = opts.now || function () { return Date.now(); };
  var later = opts.setTimeout || function (f, ms) { return win.setTimeout(f, ms); };
  var cancel = opts.clearTimeout || function (t) { win.clearTimeout(t); };
  var store = opts.storage || (function () { try { return win.sessionStorage; } catch (e) { return null; } })();
  var nav = opts.navigator || win.navigator;
  var QKEY = 'livecopy:q:' + cfg.key;
  var DKEY = 'livecopy:done:' + cfg.key;

  function userOf(token) {
    try {
      var b = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return win.atob(b + '===='.slice(b.length % 4 || 4));
    } catch (e) { return null; }
  }
  var user = userOf(cfg.token);

  function newId() {
    var a = new Uint8Array(12);
    (win.crypto || opts.crypto).getRandomValues(a);
    var s = 'lc-';
    for (var i = 0; i < a.length; i++) s += (a[i] < 16 ? '0' : '') + a[i].toString(16);
    return s;
  }
  function load(k, dflt) {
    try { var v = store && store.getItem(k); return v ? JSON.parse(v) : dflt; } catch (e) { return dflt; }
  }
  function save(k, v) { try { if (store) store.setItem(k, JSON.stringify(v)); } catch (e) { /* full: memory only */ } }

  // queue: [{ev: event, beacon: time sent by beacon (answer unseen) or 0}]
  var queue = load(QKEY, []);
  var done = load(DKEY, {}); // 'i:' + impression id / 'c:' + impression id -> 1
  var inflight = {}; // event ids sent by fetch, answer pending
  var timer = null, timerAt = 0, backoff = 0, sent = 0;

  function persist() { save(QKEY, queue); }
  function schedule(ms) { // one timer, the soonest asked for
    var at = now() + ms;
    if (timer !== null) {
      if (timerAt <= at) return;
      cancel(timer);
    }
    timerAt = at;
    timer = later(function () { timer = null; flush(false); }, ms);
  }

  function record(type, el) {
    var imp = el.getAttribute('data-livecopy-impression');
    if (!imp) { imp = newId(); el.setAttribute('data-livecopy-impression', imp); }
    var mark = (type === 'impression' ? 'i:' : 'c:') + imp;
    if (done[mark] || !user) return false;
    done[mark] = 1;
    var keys = Object.keys(done);
    if (keys.length > 1000) delete done[keys[0]];
    save(DKEY, done);
    var ev = {event_id: newId(), type: type, user_id: user, ts: now(), impression_id: imp,
      copy_id: el.getAttribute('data-livecopy-copy'), product_id: el.getAttribute('data-livecopy-product')};
    var slot = el.getAttribute('data-livecopy-slot');
    if (slot) ev.slot = slot;
    queue.push({ev: ev, beacon: 0});
    persist();
    if (queue.length >= cfg.maxBatch) flush(false); else schedule(cfg.flushMs);
    return true;
  }

  function url() {
    return cfg.endpoint + '?key=' + encodeURIComponent(cfg.key) + '&token=' + encodeURIComponent(cfg.token);
  }
  function ready(q, beacon) {
    return !inflight[q.ev.event_id] && (beacon ? !q.beacon : (!q.beacon || now() - q.beacon >= cfg.beaconRetryMs));
  }
  function forget(ids) {
    queue = queue.filter(function (q) { return !ids[q.ev.event_id]; });
    persist();
  }

  function due() { // beaconed events (answer never seen) are confirmed by fetch once beaconRetryMs passed
    var t = null;
    queue.forEach(function (q) {
      if (q.beacon && !inflight[q.ev.event_id]) {
        var d = q.beacon + cfg.beaconRetryMs - now();
        t = t === null ? d : Math.min(t, d);
      }
    });
    if (t !== null) schedule(Math.max(0, t));
  }

  function flush(beacon) {
    var batch = queue.filter(function (q) { return ready(q, beacon); }).slice(0, cfg.maxBatch);
    if (!batch.length) { due(); return false; }
    var body = JSON.stringify(batch.map(function (q) { return q.ev; }));
    sent += 1;
    if (beacon && nav.sendBeacon) {
      if (nav.sendBeacon(url(), body)) { // text/plain; the answer is never seen: kept, re-sent later
        batch.forEach(function (q) { q.beacon = now(); });
        persist();
        if (queue.some(function (q) { return ready(q, true); })) flush(true); else due();
        return true;
      }
    }
    batch.forEach(function (q) { inflight[q.ev.event_id] = 1; });
    var f = opts.fetch || (win.fetch && win.fetch.bind(win));
    f(url(), {method: 'POST', body: body, keepalive: true, credentials: 'omit', mode: 'cors',
      headers: {'Content-Type': 'text/plain;charset=UTF-8'}})
      .then(function (resp) {
        return resp.json().then(function (a) { return [resp, a]; }, function () { return [resp, null]; });
      })
      .then(function (ra) { answered(batch, ra[0], ra[1]); }, function () { answered(batch, null, null); });
    return true;
  }

  function answered(batch, resp, body) {
    batch.forEach(function (q) { delete inflight[q.ev.event_id]; });
    var settled = {}, retry = false;
    if (body && body.results) { // per event: accepted / rejected are final, failed is sent again
      body.results.forEach(function (r) {
        if (r.status !== 'failed' && batch[r.index]) settled[batch[r.index].ev.event_id] = 1;
        else retry = true;
      });
    } else if (resp && resp.status >= 400 && resp.status < 500 && resp.status !== 429 && resp.status !== 408) {
      batch.forEach(function (q) { settled[q.ev.event_id] = 1; }); // refused whole: sending again cannot help
      if (win.console) win.console.warn('livecopy: events refused', resp.status, body && body.error);
    } else {
      retry = true; // network error, 429, 5xx
    }
    forget(settled);
    if (retry) {
      var ra = resp && resp.headers && +resp.headers.get('Retry-After');
      backoff = Math.min(60000, backoff ? backoff * 2 : 1000);
      schedule(Math.max(backoff, (ra || 0) * 1000));
    } else {
      backoff = 0;
      if (queue.some(function (q) { return ready(q, false); })) schedule(cfg.flushMs); else due();
    }
  }

  // visibility: >= 50% of the element for >= dwellMs, uninterrupted, while the page is visible
  var watching = [];
  var io = null;
  var IO = opts.IntersectionObserver || win.IntersectionObserver;
  function hidden() { return doc.visibilityState === 'hidden'; }
  function check(w) {
    if (w.visible && !hidden() && !w.timer && !w.recorded) {
      w.timer = later(function () { w.timer = null; if (w.visible && !hidden()) w.recorded = record('impression', w.el); },
        cfg.dwellMs);
    } else if ((!w.visible || hidden()) && w.timer) {
      cancel(w.timer);
      w.timer = null;
    }
  }
  if (IO) {
    io = new IO(function (entries) {
      entries.forEach(function (e) {
        watching.forEach(function (w) {
          if (w.el === e.target) { w.visible = e.isIntersecting && e.intersectionRatio >= 0.5; check(w); }
        });
      });
    }, {threshold: [0, 0.5, 1]});
  }
  function watch(el) {
    if (!io || watching.some(function (w) { return w.el === el; })) return;
    watching.push({el: el, visible: false, timer: null, recorded: false});
    io.observe(el);
  }
  function scan() {
    var els = doc.querySelectorAll('[data-livecopy-copy]');
    for (var i = 0; i < els.length; i++) watch(els[i]);
  }

  doc.addEventListener('click', function (e) {
    var el = e.target && e.target.closest && e.target.closest('[data-livecopy-copy]');
    if (!el) return;
    record('impression', el); // a click on it was seen, whatever the observer said
    record('click', el);
  }, true);
  doc.addEventListener('visibilitychange', function () {
    watching.forEach(check);
    if (hidden()) flush(true);
  });
  win.addEventListener('pagehide', function () { flush(true); });
  if (win.MutationObserver) new win.MutationObserver(scan).observe(doc.documentElement, {childList: true, subtree: true});
  if (doc.readyState === 'loading') doc.addEventListener('DOMContentLoaded', scan); else scan();
  if (queue.length) schedule(0); // left from an earlier page of this session

  return {
    flush: function () { return flush(false); },
    track: watch,
    pending: function () { return queue.map(function (q) { return q.ev; }); },
    requests: function () { return sent; },
    config: cfg,
    user: user
  };
});
