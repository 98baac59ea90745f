-- Apply a user's profile updates atomically (mirror of stream/profile.py:apply_update).
-- KEYS[1] profile hash, KEYS[2] recent-products zset, KEYS[3] seen-event-ids zset:
-- all three share the user's hash tag, so the script is Redis Cluster safe.
-- ARGV: now_ms, dedupe_window_ms, recent_n, half_life_ms, ttl_ms, then one JSON update per event:
--   {"i": event_id, "y": type, "t": ts_ms, "p": product_or_null, "c": cart_add, "u": purchase_add,
--    "a": [[category, weight], ...]}
-- Returns one integer per update: 1 applied, 0 duplicate.
-- Cost per call: one HMGET of every field the updates touch, the merge in Lua, one HSET of what
-- changed, one ZADD NX per event (dedupe), one ZADD GT + trim per product.
local p, r, s = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local recent_n = tonumber(ARGV[3])
local hl = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])

local function fmt(x) return string.format('%.17g', x) end

redis.call('ZREMRANGEBYSCORE', s, '-inf', '(' .. fmt(now - window))

-- dedupe first (ZADD NX answers 0 for an id already seen, also for a repeat inside this call)
local updates, fresh = {}, {}
local names, seen_name = {'v', 'f', 'l', 'cv', 'pv'}, {v = true, f = true, l = true, cv = true, pv = true}
local function want(name)
  if not seen_name[name] then seen_name[name] = true; names[#names + 1] = name end
end
for i = 6, #ARGV do
  local u = cjson.decode(ARGV[i])
  updates[#updates + 1] = u
  local added = redis.call('ZADD', s, 'NX', now, u.i)
  fresh[#fresh + 1] = added
  if added == 1 then
    want('n:' .. u.y)
    if u.a then
      for _, cw in ipairs(u.a) do want('a:' .. cw[1]); want('t:' .. cw[1]) end
    end
  end
end

local vals = redis.call('HMGET', p, unpack(names))
local h = {}
for i, name in ipairs(names) do h[name] = tonumber(vals[i]) end
local dirty = {}
local function set(name, value) h[name] = value; dirty[name] = true end

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
        elseif t >= ref then
          value, ref = value * 2 ^ (-(t - ref) / hl) + w, t
        else
          value = value + w * 2 ^ (-(ref - t) / hl)
        end
        set(an, value); set(tn, ref)
      end
    end
    if type(u.p) == 'string' then
      redis.call('ZADD', r, 'GT', t, u.p)
    end
  end
end

local args = {}
for name, _ in pairs(dirty) do
  args[#args + 1] = name
  args[#args + 1] = fmt(h[name])
end
if #args > 0 then
  redis.call('HSET', p, unpack(args))
  redis.call('ZREMRANGEBYRANK', r, 0, -(recent_n + 1))
  if ttl > 0 then
    redis.call('PEXPIRE', p, ttl)
    redis.call('PEXPIRE', r, ttl)
    redis.call('PEXPIRE', s, ttl)
  end
end
return fresh
