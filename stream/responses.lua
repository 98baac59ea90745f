-- Add feedback records to one shopper's style response (mirror of stream/responses.py:
-- InMemoryResponseStore.apply). KEYS[1] response hash (fields c:<style> clicks, e:<style> expected
-- clicks), KEYS[2] zset of impression ids already counted: both carry the user's hash tag, so
-- the script is Redis Cluster safe.
-- ARGV: now_ms, dedupe_window_ms, ttl_ms, then one JSON item per record:
--   {"i": impression_id, "s": style, "e": predicted CTR, "c": 0|1}
-- Returns one integer per item: 1 counted, 0 duplicate.
local h, seen = KEYS[1], KEYS[2]
local now, window, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. string.format('%.17g', now - window))
local out = {}
for i = 4, #ARGV do
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
