#!lua
-- (#!lua with no flags, Redis >= 7: over maxmemory the whole call is refused with OOM, a transient
-- error the worker waits out, instead of the script writing past the limit once its first write ran.)
-- Apply the profile updates of one or more users, each user's atomically (mirror of
-- stream/profile/logic.py:apply_update).
-- KEYS, four per user: profile hash, recent-products zset, seen-event-ids zset, and the tombstone of
-- a forgotten shopper (its value: when, ms; events dated up to then take no effect). A user's four
-- keys share the user's hash tag; on a Redis Cluster every user of a call is in one slot.
-- ARGV: now_ms, dedupe_window_ms, recent_n, half_life_ms, ttl_ms, max_categories, max_seen (0: no cap),
-- then per user, in the order of KEYS: the number of its updates, then one JSON update per event:
--   {"i": event_id, "y": type, "t": ts_ms, "p": product_or_null, "c": cart_add, "u": purchase_add,
--    "a": [[category, weight], ...]}
-- Returns one integer per update, users in order: 1 applied, 0 duplicate.
--
-- Redis does not roll a script back when it fails half way, so the script runs in phases: first it
-- only decodes and checks every update of every user (every error a bad call can raise happens here,
-- before anything is written); then per user it reads and merges, then writes, the dedupe markers
-- last. The one error left after a first write, a profile hash found corrupt, fails the call after
-- the users before it took effect with their markers: a retry counts those as duplicates.
-- No command gets an unbounded list unpacked (Lua's unpack stops at ~8000 values, and one user
-- with many events and deep categories touches more fields than that): lists go in slices.
-- Cost per user: ZMSCORE + HMGET of what the updates touch, the merge in Lua, HSET of what
-- changed, ZADD GT of the products, ZADD of the markers (each one command per CHUNK arguments).
-- The worker sends many users per call (profile.users_per_call): the per-user commands are most of
-- the server's cost, but one call per user cost the worker as much again in packing and parsing.
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local recent_n = tonumber(ARGV[3])
local hl = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local max_cat = tonumber(ARGV[6])
local max_seen = tonumber(ARGV[7])
if not (now and window and recent_n and hl and ttl and max_cat and max_seen) or hl <= 0 or recent_n < 0 then
  return redis.error_reply('ERR profile.lua: bad header arguments')
end

local CHUNK = 500  -- most list items per command

local function fmt(x) return string.format('%.17g', x) end

-- redis.call(cmd, key, [opt,] list[i..j]) over consecutive slices of `list` (a whole number of
-- `step`-sized groups each); the replies of the slices, concatenated.
local function chunked(cmd, key, opt, list, step)
  local out, size = {}, CHUNK - CHUNK % step
  if #list <= size then  -- the common case: one command, its reply as it is
    if opt then return redis.call(cmd, key, opt, unpack(list)) end
    return redis.call(cmd, key, unpack(list))
  end
  for i = 1, #list, size do
    local j = math.min(i + size - 1, #list)
    local reply
    if opt then reply = redis.call(cmd, key, opt, unpack(list, i, j))
    else reply = redis.call(cmd, key, unpack(list, i, j)) end
    if type(reply) == 'table' then
      for k = 1, #reply do out[#out + 1] = reply[k] end
    end
  end
  return out
end

-- Phase 1: decode and check the updates ARGV[first..last] (nothing written yet)
local function bad(k, what)
  return redis.error_reply('ERR profile.lua: update ' .. k .. ': ' .. what)
end
local function decode(first, last)
  local updates, ids = {}, {}
  for i = first, last do
    local k = i - first + 1
    local ok, u = pcall(cjson.decode, ARGV[i])
    if not ok or type(u) ~= 'table' then return bad(k, 'not a JSON object') end
    if type(u.i) ~= 'string' then return bad(k, 'event id "i" is not a string') end
    if type(u.y) ~= 'string' then return bad(k, 'type "y" is not a string') end
    if type(u.t) ~= 'number' then return bad(k, 'time "t" is not a number') end
    if u.c ~= nil and type(u.c) ~= 'number' then return bad(k, 'cart value "c" is not a number') end
    if u.u ~= nil and type(u.u) ~= 'number' then return bad(k, 'purchase value "u" is not a number') end
    if u.p ~= nil and u.p ~= cjson.null and type(u.p) ~= 'string' then return bad(k, 'product "p" is not a string') end
    if u.a ~= nil then
      if type(u.a) ~= 'table' then return bad(k, 'affinity "a" is not a list') end
      for _, cw in ipairs(u.a) do
        if type(cw) ~= 'table' or type(cw[1]) ~= 'string' or type(cw[2]) ~= 'number' then
          return bad(k, 'affinity "a" is not a list of [category, weight]')
        end
      end
    end
    updates[k] = u
    ids[k] = u.i
  end

  return {updates = updates, ids = ids}
end

-- byte order, whatever the server's locale (Lua's < on strings uses strcoll)
local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- A sorted set that one large batch inflated and the trim shrank keeps its inflated memory (its hash table
-- does not shrink, a listpack turned skiplist stays one): written anew, it costs what its size costs.
local function compact(key, removed)
  if removed < 128 then return end
  local all = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local pairs_ = {}
  for i = 1, #all, 2 do pairs_[#pairs_ + 1] = all[i + 1]; pairs_[#pairs_ + 1] = all[i] end
  redis.call('DEL', key)
  if #pairs_ > 0 then chunked('ZADD', key, nil, pairs_, 2) end
end

-- Phases 2 and 3 for one user: read and merge, then write
local function apply_user(p, r, s, gone_key, updates, ids)
  -- Dedupe by reading: an id is seen when its marker is inside the window (what the prune below
  -- keeps), or when an earlier update of this call has it.
  local scores = chunked('ZMSCORE', s, nil, ids, 1)
  local gone = gone_key and tonumber(redis.call('GET', gone_key))
  local oldest = now - window
  local fresh, taken, any = {}, {}, false
  local names, seen_name = {'v', 'f', 'l', 'cv', 'pv'}, {v = true, f = true, l = true, cv = true, pv = true}
  local function want(name)
    if not seen_name[name] then seen_name[name] = true; names[#names + 1] = name end
  end
  for k, u in ipairs(updates) do
    local sc = scores[k] and tonumber(scores[k])
    if taken[u.i] or (sc and sc >= oldest) or (gone and u.t <= gone) then
      fresh[k] = 0
    else
      fresh[k] = 1
      taken[u.i] = true
      any = true
      want('n:' .. u.y)
      if u.a then
        for _, cw in ipairs(u.a) do want('a:' .. cw[1]); want('t:' .. cw[1]) end
      end
    end
  end

  -- The merge, in memory. When this call could take the shopper past max_categories, the whole hash is
  -- read (it holds at most about 2 x max_categories + 12 fields, since it is kept capped) so that the
  -- categories can be ranked after every update, as the Python merge does.
  local h, dirty, products, dropped = {}, {}, {}, {}
  local cats, ncat = nil, 0
  if any then
    local new_names = 0
    for _, name in ipairs(names) do if string.sub(name, 1, 2) == 'a:' then new_names = new_names + 1 end end
    if max_cat > 0 and redis.call('HLEN', p) / 2 + new_names > max_cat then
      local all = redis.call('HGETALL', p)
      cats = {}
      for i = 1, #all, 2 do
        h[all[i]] = tonumber(all[i + 1])
        if string.sub(all[i], 1, 2) == 'a:' then cats[string.sub(all[i], 3)] = true; ncat = ncat + 1 end
      end
    else
      local vals = chunked('HMGET', p, nil, names, 1)
      for i, name in ipairs(names) do h[name] = tonumber(vals[i]) end
    end
  end
  local function set(name, value) h[name] = value; dirty[name] = true; dropped[name] = nil end

  -- keep the max_cat categories with the highest affinity decayed to `at` (ties: by name), as top_categories
  local function cap_categories(at)
    local ranked = {}
    for c, _ in pairs(cats) do
      ranked[#ranked + 1] = {c, h['a:' .. c] * 2 ^ (-(at - h['t:' .. c]) / hl)}
    end
    table.sort(ranked, function(x, y)
      if x[2] ~= y[2] then return x[2] > y[2] end
      return bytes_lt(x[1], y[1])
    end)
    for i = max_cat + 1, #ranked do
      local c = ranked[i][1]
      cats[c] = nil
      ncat = ncat - 1
      for _, name in ipairs({'a:' .. c, 't:' .. c}) do h[name] = nil; dirty[name] = nil; dropped[name] = true end
    end
  end

  for k, u in ipairs(updates) do
    if fresh[k] == 1 then
      local t = u.t
      set('v', (h['v'] or 0) + 1)
      set('n:' .. u.y, (h['n:' .. u.y] or 0) + 1)
      if (not h['f']) or t < h['f'] then set('f', t) end
      if (not h['l']) or t > h['l'] then set('l', t) end
      if u.c and u.c ~= 0 then set('cv', (h['cv'] or 0) + u.c) end
      if u.u and u.u ~= 0 then set('pv', (h['pv'] or 0) + u.u) end
      if u.a then
        for _, cw in ipairs(u.a) do
          local an, tn, w = 'a:' .. cw[1], 't:' .. cw[1], cw[2]
          local value, ref = h[an], h[tn]
          if not value then
            value, ref = w, t
          elseif not ref then
            return redis.error_reply('ERR profile.lua: ' .. p .. ' has ' .. an .. ' without ' .. tn)
          elseif t >= ref then
            value, ref = value * 2 ^ (-(t - ref) / hl) + w, t
          else
            value = value + w * 2 ^ (-(ref - t) / hl)
          end
          if cats and not cats[cw[1]] then cats[cw[1]] = true; ncat = ncat + 1 end
          set(an, value); set(tn, ref)
        end
        if cats and ncat > max_cat then cap_categories(h['l']) end
      end
      if type(u.p) == 'string' and ((not products[u.p]) or t > products[u.p]) then products[u.p] = t end
    end
  end

  local args, recent, gone_fields = {}, {}, {}
  for name, _ in pairs(dropped) do gone_fields[#gone_fields + 1] = name end
  for name, _ in pairs(dirty) do
    args[#args + 1] = name
    args[#args + 1] = fmt(h[name])
  end
  for product, t in pairs(products) do
    recent[#recent + 1] = fmt(t)
    recent[#recent + 1] = product
  end
  local marks = {}
  for k, u in ipairs(updates) do
    if fresh[k] == 1 then
      marks[#marks + 1] = fmt(now)
      marks[#marks + 1] = u.i
    end
  end

  -- Phase 3: the writes (only commands that cannot fail on these arguments), markers last
  redis.call('ZREMRANGEBYSCORE', s, '-inf', '(' .. fmt(oldest))
  if any then
    if #args > 0 then chunked('HSET', p, nil, args, 2) end
    if #gone_fields > 0 then chunked('HDEL', p, nil, gone_fields, 1) end
    if #recent > 0 then chunked('ZADD', r, 'GT', recent, 2) end
    compact(r, redis.call('ZREMRANGEBYRANK', r, 0, -(recent_n + 1)))
    chunked('ZADD', s, nil, marks, 2)
    if max_seen > 0 then compact(s, redis.call('ZREMRANGEBYRANK', s, 0, -(max_seen + 1))) end
    if ttl > 0 then
      redis.call('PEXPIRE', p, ttl)
      redis.call('PEXPIRE', r, ttl)
      redis.call('PEXPIRE', s, ttl)
    end
  end
  return fresh
end

-- Decode every user's updates first, then apply them user by user.
if #KEYS % 4 ~= 0 then return redis.error_reply('ERR profile.lua: keys come four per user') end
local users, at = {}, 8
for u = 1, #KEYS / 4 do
  local n = tonumber(ARGV[at])
  if not n or n < 0 or n ~= math.floor(n) or at + n > #ARGV then
    return redis.error_reply('ERR profile.lua: user ' .. u .. ': bad update count')
  end
  local d = decode(at + 1, at + n)
  if d.err then return d end
  users[u] = d
  at = at + 1 + n
end
if at <= #ARGV then return redis.error_reply('ERR profile.lua: more arguments than the keys have updates') end
local out = {}
for u, d in ipairs(users) do
  local k = 4 * (u - 1)
  local fresh = apply_user(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], d.updates, d.ids)
  if fresh.err then return fresh end
  for i = 1, #fresh do out[#out + 1] = fresh[i] end
end
return out
