// The tracker's logic in node (node:test, no dependencies), against a fake page: a manual clock, a
// fake IntersectionObserver the test drives, sessionStorage, fetch and sendBeacon that record what they
// were given. The real browser (headless Chromium against the service) is tests/integration/test_tracker_browser.py.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const {webcrypto} = require('node:crypto');
const factory = require('../../services/api/static/livecopy-tracker.js');

function b64url(s) { return Buffer.from(s).toString('base64').replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, ''); }
const TOKEN = `lcs1.${b64url('u-42')}.9999999999.sig`;

class El {
  constructor(attrs) { this.attrs = {...attrs}; }
  getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  closest() { return 'data-livecopy-copy' in this.attrs ? this : null; }
}

function page({storage, responder} = {}) {
  const clock = {t: 1_000_000, timers: []};
  const listeners = {doc: {}, win: {}};
  const on = (bag) => (type, f) => { (bag[type] = bag[type] || []).push(f); };
  const fire = (bag, type, ev) => (bag[type] || []).forEach((f) => f(ev || {}));
  const els = [
    new El({'data-livecopy-copy': 'c-1', 'data-livecopy-product': 'sku-1', 'data-livecopy-impression': 'imp-1',
      'data-livecopy-slot': 'pdp'}),
    new El({'data-livecopy-copy': 'c-2', 'data-livecopy-product': 'sku-2'}),
  ];
  const store = storage || new Map();
  const fetches = [], beacons = [];
  let observer = null;
  const doc = {
    visibilityState: 'visible', readyState: 'complete', documentElement: {},
    addEventListener: on(listeners.doc), querySelectorAll: () => els, querySelector: () => null,
  };
  const win = {
    document: doc, addEventListener: on(listeners.win), crypto: webcrypto, console: {warn() {}},
    atob: (s) => Buffer.from(s, 'base64').toString('binary'),
  };
  class IO {
    constructor(cb) { this.cb = cb; this.els = []; observer = this; }
    observe(el) { this.els.push(el); }
  }
  const respond = responder || ((body) => ({status: 200, json: {results: body.map((e, i) => ({index: i, event_id: e.event_id, status: 'accepted'}))}}));
  const tracker = factory(win, {
    key: 'lcpk_test', token: TOKEN, endpoint: 'https://c.example/v1/events', flushMs: 3000, maxBatch: 20,
    now: () => clock.t,
    setTimeout: (f, ms) => { const t = {f, at: clock.t + ms}; clock.timers.push(t); return t; },
    clearTimeout: (t) => { clock.timers = clock.timers.filter((x) => x !== t); },
    storage: {getItem: (k) => (store.has(k) ? store.get(k) : null), setItem: (k, v) => store.set(k, v)},
    navigator: {sendBeacon: (url, body) => { beacons.push({url, events: JSON.parse(body)}); return true; }},
    fetch: (url, init) => {
      const events = JSON.parse(init.body);
      fetches.push({url, init, events});
      const r = respond(events, fetches.length);
      if (r === 'network') return Promise.reject(new TypeError('network'));
      return Promise.resolve({status: r.status, headers: {get: (h) => (r.headers || {})[h] || null},
        json: () => (r.json ? Promise.resolve(r.json) : Promise.reject(new Error('no json')))});
    },
    IntersectionObserver: IO,
  });
  const settle = () => new Promise((res) => setImmediate(res));
  return {
    tracker, els, store, fetches, beacons, clock, doc,
    see(el, ratio) { observer.cb([{target: el, isIntersecting: ratio > 0, intersectionRatio: ratio}]); },
    click(el) { fire(listeners.doc, 'click', {target: el}); },
    hide() { doc.visibilityState = 'hidden'; fire(listeners.doc, 'visibilitychange'); },
    pagehide() { fire(listeners.win, 'pagehide'); },
    async advance(ms) {
      const end = clock.t + ms;
      for (;;) {
        const due = clock.timers.filter((x) => x.at <= end).sort((a, b) => a.at - b.at)[0];
        if (!due) break;
        clock.t = due.at;
        clock.timers = clock.timers.filter((x) => x !== due);
        due.f();
        await settle();
        await settle();
      }
      clock.t = end;
      await settle();
    },
  };
}

const sentEvents = (p) => p.fetches.flatMap((f) => f.events);

test('the shopper comes from the token', () => {
  assert.equal(page().tracker.user, 'u-42');
});

test('an impression needs half the element visible for one continuous second', async () => {
  const p = page();
  p.see(p.els[0], 0.6);
  await p.advance(600);
  p.see(p.els[0], 0.3); // under half before the second was up: nothing
  await p.advance(2000);
  assert.equal(p.tracker.pending().length, 0);
  p.see(p.els[0], 1.0);
  await p.advance(999);
  assert.equal(p.tracker.pending().length, 0);
  await p.advance(1);
  assert.deepEqual(p.tracker.pending().map((e) => [e.type, e.copy_id, e.impression_id, e.product_id, e.slot, e.user_id]),
    [['impression', 'c-1', 'imp-1', 'sku-1', 'pdp', 'u-42']]);
  p.see(p.els[0], 0); p.see(p.els[0], 1); // seen again: still one impression per impression id
  await p.advance(5000);
  assert.deepEqual(sentEvents(p).map((e) => e.type), ['impression']);
});

test('a page hidden before the second is up records nothing', async () => {
  const p = page();
  p.see(p.els[0], 1);
  await p.advance(500);
  p.hide();
  await p.advance(5000);
  assert.equal(sentEvents(p).length + p.beacons.length, 0);
});

test('a click records one click (and the impression it implies), a second click nothing', async () => {
  const p = page();
  p.click(p.els[1]);
  p.click(p.els[1]);
  const [imp, click] = p.tracker.pending();
  assert.deepEqual([imp.type, click.type], ['impression', 'click']);
  assert.equal(imp.impression_id, click.impression_id);
  assert.match(imp.impression_id, /^lc-[0-9a-f]{24}$/); // made here, and put on the element
  assert.equal(p.els[1].getAttribute('data-livecopy-impression'), imp.impression_id);
  assert.notEqual(imp.event_id, click.event_id);
  await p.advance(3000);
  assert.equal(p.fetches.length, 1);
  assert.deepEqual(sentEvents(p).map((e) => e.type), ['impression', 'click']);
  assert.equal(p.fetches[0].url, 'https://c.example/v1/events?key=lcpk_test&token=' + encodeURIComponent(TOKEN));
  assert.equal(p.fetches[0].init.keepalive, true);
  assert.equal(p.tracker.pending().length, 0); // acknowledged: gone from sessionStorage too
  assert.deepEqual(JSON.parse(p.store.get('livecopy:q:lcpk_test')), []);
});

test('events are batched; a full batch goes at once', async () => {
  const p = page();
  p.click(p.els[0]);
  p.click(p.els[1]);
  await p.advance(2999);
  assert.equal(p.fetches.length, 0);
  await p.advance(1);
  assert.equal(p.fetches.length, 1);
  assert.equal(p.fetches[0].events.length, 4);
});

test('a failed batch is sent again with the same event ids, after a backoff', async () => {
  const answers = [
    'network',
    {status: 503, headers: {'Retry-After': '2'}, json: {error: 'unavailable'}},
  ];
  const p = page({responder: (body, n) => answers[n - 1] || {status: 200, json: {results: body.map((e, i) => ({index: i, status: 'accepted'}))}}});
  p.click(p.els[0]);
  await p.advance(3000);
  assert.equal(p.fetches.length, 1);
  await p.advance(999);
  assert.equal(p.fetches.length, 1); // 1 s backoff
  await p.advance(1);
  assert.equal(p.fetches.length, 2);
  await p.advance(1999); // Retry-After: 2
  assert.equal(p.fetches.length, 2);
  await p.advance(1);
  assert.equal(p.fetches.length, 3);
  const ids = p.fetches.map((f) => f.events.map((e) => e.event_id).join());
  assert.equal(new Set(ids).size, 1);
  assert.equal(p.tracker.pending().length, 0);
  await p.advance(60000);
  assert.equal(p.fetches.length, 3);
});

test('per event: accepted and rejected are settled, failed ones are sent again', async () => {
  const p = page({responder: (body, n) => (n === 1
    ? {status: 503, json: {results: [{index: 0, status: 'accepted'}, {index: 1, status: 'failed'}]}}
    : {status: 200, json: {results: body.map((e, i) => ({index: i, status: 'accepted'}))}})});
  p.click(p.els[0]);
  await p.advance(3000);
  const [first, second] = p.fetches[0].events;
  assert.deepEqual(p.tracker.pending().map((e) => e.event_id), [second.event_id]);
  await p.advance(1000);
  assert.deepEqual(p.fetches[1].events.map((e) => e.event_id), [second.event_id]);
  assert.notEqual(first.event_id, second.event_id);
  assert.equal(p.tracker.pending().length, 0);
});

test('a batch refused whole (401) is dropped, not sent forever', async () => {
  const p = page({responder: () => ({status: 401, json: {error: 'token_expired'}})});
  p.click(p.els[0]);
  await p.advance(3000);
  await p.advance(120000);
  assert.equal(p.fetches.length, 1);
  assert.equal(p.tracker.pending().length, 0);
});

test('page hide flushes by beacon; the next page confirms the same ids, nothing twice', async () => {
  const storage = new Map();
  const p = page({storage});
  p.click(p.els[0]);
  p.pagehide();
  p.hide(); // visibilitychange after pagehide: nothing more to send
  assert.equal(p.beacons.length, 1);
  assert.equal(p.fetches.length, 0);
  const beaconed = p.beacons[0].events.map((e) => e.event_id);
  assert.equal(beaconed.length, 2);
  assert.ok(p.beacons[0].url.includes('token='));
  // the beacon's answer is never seen: the next page of the session sends the same ids again
  const next = page({storage, responder: (body) => ({status: 200, json: {results: body.map((e, i) => ({index: i, status: 'accepted', duplicate: true}))}})});
  next.clock.t = p.clock.t + 500;
  await next.advance(20000);
  assert.equal(next.fetches.length, 1);
  assert.deepEqual(next.fetches[0].events.map((e) => e.event_id), beaconed);
  assert.equal(next.tracker.pending().length, 0);
  next.click(next.els[0]); // impression and click of imp-1 were recorded in this session already
  assert.equal(next.tracker.pending().length, 0);
});
