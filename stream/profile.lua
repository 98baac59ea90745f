-- Apply a user's profile updates atomically (mirror of stream/profile.py:apply_update).
-- KEYS[1] profile hash, KEYS[2] recent-products zset, KEYS[3] seen-event-ids zset:
-- all three share the user's hash tag, so the script is Redis Cluster safe.
-- ARGV: now_ms, dedupe_window_ms, recent_n, half_life_ms, ttl_ms, then one JSON update per event:
--   {"i": event_id, "y": type, "t": ts_ms, "p": product_or_null, "c": cart_add, "u": purchase_add,
--    "a": [[category, weight], ...]}
-- Returns one integer per update: 1 applied, 0 duplicate.
local p, r, s = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local recent_n = tonumber(ARGV[3])
local hl = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])

local function fmt(x) return string.format('%.17g', x) end

redis.call('ZREMRANGEBYSCORE', s, '-inf', '(' .. fmt(now - window))
local out = {}
for i = 6, #ARGV do
  local u = cjson.decode(ARGV[i])
  if redis.call('ZSCORE', s, u.i) then
    out[#out + 1] = 0
  else
    redis.call('ZADD', s, now, u.i)
    redis.call('HINCRBY', p, 'v', 1)
    redis.call('HINCRBY', p, 'n:' .. u.y, 1)
    local t = u.t
    local first = tonumber(redis.call('HGET', p, 'f'))
    if (not first) or t < first then redis.call('HSET', p, 'f', fmt(t)) end
    local last = tonumber(redis.call('HGET', p, 'l'))
    if (not last) or t > last then redis.call('HSET', p, 'l', fmt(t)) end
    if u.c and u.c ~= 0 then
      redis.call('HSET', p, 'cv', fmt((tonumber(redis.call('HGET', p, 'cv')) or 0) + u.c))
    end
    if u.u and u.u ~= 0 then
      redis.call('HSET', p, 'pv', fmt((tonumber(redis.call('HGET', p, 'pv')) or 0) + u.u))
    end
    if u.a then
      for _, cw in ipairs(u.a) do
        local cat, w = cw[1], cw[2]
        local vals = redis.call('HMGET', p, 'a:' .. cat, 't:' .. cat)
        local value, ref = tonumber(vals[1]), tonumber(vals[2])
        if not value then
          value, ref = w, t
        elseif t >= ref then
          value, ref = value * 2 ^ (-(t - ref) / hl) + w, t
        else
          value = value + w * 2 ^ (-(ref - t) / hl)
        end
        redis.call('HSET', p, 'a:' .. cat, fmt(value), 't:' .. cat, fmt(ref))
      end
    end
    if type(u.p) == 'string' then
      redis.call('ZADD', r, 'GT', t, u.p)
      redis.call('ZREMRANGEBYRANK', r, 0, -(recent_n + 1))
    end
    out[#out + 1] = 1
  end
end
if ttl > 0 then
  redis.call('PEXPIRE', p, ttl)
  redis.call('PEXPIRE', r, ttl)
  redis.call('PEXPIRE', s, ttl)
end
return out
