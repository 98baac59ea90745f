#!lua
-- (#!lua with no flags, Redis >= 7: over maxmemory the whole call is refused with OOM, a transient
-- error the worker waits out, instead of the script writing past the limit once its first write ran.)
-- Add feedback records to one shopper's style response (mirror of stream/responses.py:
-- apply_updates). KEYS[1] response hash (fields c:<style> clicks, e:<style> expected clicks,
-- t: ms the counts are as of), KEYS[2] zset of impression ids already counted: both carry the
-- user's hash tag, so the script is Redis Cluster safe.
-- ARGV: now_ms, dedupe_window_ms, ttl_ms, half_life_ms (0: no decay), then one JSON item per record:
--   {"i": impression_id, "s": style, "e": predicted CTR, "c": 0|1}
-- Returns one integer per item: 1 counted, 0 duplicate.
local h, seen = KEYS[1], KEYS[2]
local now, window, ttl, half_life = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local as_of = tonumber(redis.call('HGET', h, 't') or '')
if as_of == nil or now > as_of then
  local aged = {}
  if half_life > 0 and as_of ~= nil then  -- age the evidence: x 0.5 ^ (elapsed / half-life)
    local f = 0.5 ^ ((now - as_of) / half_life)
    local fields = redis.call('HGETALL', h)
    for j = 1, #fields, 2 do
      local kind = string.sub(fields[j], 1, 2)
      if kind == 'c:' or kind == 'e:' then
        aged[#aged + 1] = fields[j]
        aged[#aged + 1] = string.format('%.17g', tonumber(fields[j + 1]) * f)
      end
    end
  end
  redis.call('HSET', h, 't', ARGV[1], unpack(aged))  -- one write: the aged counts and their time
end
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. string.format('%.17g', now - window))
local out = {}
for i = 5, #ARGV do
  local u = cjson.decode(ARGV[i])
  local added = redis.call('ZADD', seen, 'NX', now, u.i)
  out[#out + 1] = added
  if added == 1 then
    redis.call('HINCRBYFLOAT', h, 'e:' .. u.s, string.format('%.17g', u.e))
    if u.c == 1 then redis.call('HINCRBYFLOAT', h, 'c:' .. u.s, 1) end
  end
end
if ttl > 0 then
  redis.call('PEXPIRE', h, ttl)
  redis.call('PEXPIRE', seen, ttl)
end
return out
