#!lua
-- (#!lua with no flags, Redis >= 7: over maxmemory the whole call is refused with OOM, a transient
-- error the worker waits out, instead of the script writing past the limit once its first write ran.)
-- The feedback joiner's state for one shard (mirror of stream/feedback.py: apply_item, decide,
-- InMemoryFeedbackStore.apply/claim/ack; keep them in step).
-- KEYS[1] due zset (impression_id -> when to look at it next), KEYS[2] CTR aggregate hash.
-- Other keys of the shard are built from ARGV[2], the shard prefix `<prefix>fb:{N}:`, so every
-- key the script touches shares the hash tag {N} of the declared keys (one Cluster slot):
--   <P>i:<impression_id>  hash  u p c sl it is ct cs src rk st tok
--   <P>r:<impression_id>  string, the value of the record src names (its key: rk; none: no rk), as read,
--                         for the DLQ; deleted when the impression is done
--   <P>c:<copy_id>        string, the copy record JSON
--   <P>w:<copy_id>        set of impression ids waiting for that copy record
-- ARGV[1] op: apply | claim | ack. ARGV[3] now_ms. Then, per op:
--   apply: window_ms lateness_ms copy_wait_ms orphan_wait_ms state_ttl_ms, then per item its JSON
--          {"k":"i"|"c","i":imp,"c":copy,"u":user,"p":product,"t":ts,"sl":slot,"src":source[,"r":1[,"nk":1]]}
--          -- with "r", two more ARGVs follow: the record's key ('' and "nk" when it had none) and value --
--          or {"k":"p","c":copy,"j":copy_json}; returns 1 (changed) / 0 (duplicate) per item
--   claim: window_ms lateness_ms copy_wait_ms orphan_wait_ms token limit reclaim_ms state_ttl_ms; returns
--          {imp, state_json, copy_json or '', kind, clicked, reason, record value or nil, record key or nil}
--          per claimed impression
--   ack:   done_ttl_ms, then {"i":imp,"t":token,"k":clicked,"d":[dim...]} each; returns the count
local due, ctr = KEYS[1], KEYS[2]
local op, P, now = ARGV[1], ARGV[2], tonumber(ARGV[3])

local function fmt(x) return string.format('%.0f', x) end

local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

local window, lateness, copy_wait, orphan_wait

local function decide(h, copy_present)
  if h.st == 'd' then return 'drop', 0, 0, '' end
  if not h.it then
    local deadline = tonumber(h.cs) + orphan_wait
    if now >= deadline then return 'orphan', 0, 0, 'impression_not_found' end
    return 'wait', 0, deadline, ''
  end
  local it, is = tonumber(h.it), tonumber(h.is)
  local close_at = math.max(it + window, is) + lateness
  local clicked = (h.ct ~= nil) and (tonumber(h.ct) <= it + window)
  if (not clicked) and now < close_at then return 'wait', 0, close_at, '' end
  local c = clicked and 1 or 0
  if copy_present then return 'emit', c, 0, '' end
  local decided_at = close_at
  if clicked then decided_at = math.max(is, tonumber(h.cs or '0')) end
  local deadline = decided_at + copy_wait
  if now >= deadline then return 'orphan', c, 0, 'copy_not_found' end
  return 'wait', 0, deadline, ''
end

local function schedule(imp, h, ttl)
  local present = redis.call('EXISTS', P .. 'c:' .. h.c) == 1
  local kind, _, at = decide(h, present)
  if kind == 'emit' or kind == 'orphan' then at = now end
  redis.call('ZADD', due, at, imp)
  if not present then
    local wk = P .. 'w:' .. h.c
    redis.call('SADD', wk, imp)
    redis.call('PEXPIRE', wk, ttl)
  end
end

-- The record that src names becomes the one kept for the DLQ (rval nil: none kept).
local function keep_record(key, imp, h, u, rkey, rval, set, ttl)
  if rval then
    redis.call('SET', P .. 'r:' .. imp, rval, 'PX', ttl)
  else
    redis.call('DEL', P .. 'r:' .. imp)
  end
  if rval and not u.nk then
    h.rk = rkey
    set[#set + 1] = 'rk'; set[#set + 1] = rkey
  elseif h.rk then
    h.rk = nil
    redis.call('HDEL', key, 'rk')
  end
end

if op == 'apply' then
  window, lateness, copy_wait, orphan_wait = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local ttl = tonumber(ARGV[8])
  local out = {}
  local i = 9
  while i <= #ARGV do
    local u = cjson.decode(ARGV[i])
    local rkey, rval = nil, nil
    if u.r then
      rkey, rval = ARGV[i + 1], ARGV[i + 2]
      i = i + 3
    else
      i = i + 1
    end
    if u.k == 'p' then
      local ck = P .. 'c:' .. u.c
      local fresh = 1 - redis.call('EXISTS', ck)
      redis.call('SET', ck, u.j, 'PX', ttl)
      local wk = P .. 'w:' .. u.c
      for _, imp in ipairs(redis.call('SMEMBERS', wk)) do
        local sc = redis.call('ZSCORE', due, imp)
        if sc and tonumber(sc) > now then redis.call('ZADD', due, now, imp) end
      end
      redis.call('DEL', wk)
      out[#out + 1] = fresh
    else
      local key = P .. 'i:' .. u.i
      local h = hgetall(key)
      local set = {}
      if h.st ~= 'd' then
        if u.k == 'i' then
          if not h.it then
            h.c, h.u, h.p, h.it, h.is, h.src = u.c, u.u, u.p, fmt(u.t), fmt(now), u.src
            set = {'c', h.c, 'u', h.u, 'p', h.p, 'it', h.it, 'is', h.is, 'src', h.src}
            if type(u.sl) == 'string' then
              h.sl = u.sl
              set[#set + 1] = 'sl'; set[#set + 1] = u.sl
            elseif h.sl then
              h.sl = nil
              redis.call('HDEL', key, 'sl')
            end
            keep_record(key, u.i, h, u, rkey, rval, set, ttl)
          end
        else
          if (not h.ct) or u.t < tonumber(h.ct) then
            h.ct = fmt(u.t)
            set[#set + 1] = 'ct'; set[#set + 1] = h.ct
          end
          if not h.cs then
            h.cs = fmt(now)
            set[#set + 1] = 'cs'; set[#set + 1] = h.cs
          end
          if (not h.it) and (not h.c) then
            h.c, h.u, h.p, h.src = u.c, u.u, u.p, u.src
            for _, f in ipairs({'c', 'u', 'p', 'src'}) do set[#set + 1] = f; set[#set + 1] = h[f] end
            if type(u.sl) == 'string' then h.sl = u.sl; set[#set + 1] = 'sl'; set[#set + 1] = u.sl end
            keep_record(key, u.i, h, u, rkey, rval, set, ttl)
          end
        end
      end
      if #set > 0 then
        redis.call('HSET', key, unpack(set))
        redis.call('PEXPIRE', key, ttl)
        redis.call('PEXPIRE', P .. 'r:' .. u.i, ttl)  -- the kept record lives as long as its state
        if (h.st or 'o') == 'o' then schedule(u.i, h, ttl) end
        out[#out + 1] = 1
      else
        out[#out + 1] = 0
      end
    end
  end
  return out
end

if op == 'claim' then
  window, lateness, copy_wait, orphan_wait = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local token, limit, reclaim, ttl = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
  local out = {}
  for _, imp in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)) do
    local key = P .. 'i:' .. imp
    local h = hgetall(key)
    if next(h) == nil then
      redis.call('ZREM', due, imp)  -- its state expired
    else
      local copy = redis.call('GET', P .. 'c:' .. h.c)
      local st = h.st
      if st == 'e' then h.st = 'o' end  -- an emission that was never acknowledged: decide again
      local kind, clicked, at, reason = decide(h, copy ~= false)
      if kind == 'drop' then
        redis.call('ZREM', due, imp)
      elseif kind == 'wait' then
        redis.call('ZADD', due, at, imp)
        if copy == false then
          local wk = P .. 'w:' .. h.c
          redis.call('SADD', wk, imp)
          redis.call('PEXPIRE', wk, ttl)
        end
      else
        redis.call('HSET', key, 'st', 'e', 'tok', token)
        redis.call('ZADD', due, now + reclaim, imp)
        local rkey = h.rk or false
        h.st, h.tok, h.rk = nil, nil, nil
        out[#out + 1] = {imp, cjson.encode(h), copy or '', kind, clicked, reason,
                         redis.call('GET', P .. 'r:' .. imp), rkey}
      end
    end
  end
  return out
end

if op == 'ack' then
  local done_ttl = tonumber(ARGV[4])
  local n = 0
  for i = 5, #ARGV do
    local a = cjson.decode(ARGV[i])
    local key = P .. 'i:' .. a.i
    local cur = redis.call('HMGET', key, 'st', 'tok')
    if cur[1] == 'e' and cur[2] == a.t then
      redis.call('HSET', key, 'st', 'd')
      redis.call('HDEL', key, 'rk')
      redis.call('DEL', P .. 'r:' .. a.i)  -- a done impression never goes to the DLQ
      redis.call('PEXPIRE', key, done_ttl)
      redis.call('ZREM', due, a.i)
      for _, dim in ipairs(a.d) do
        redis.call('HINCRBY', ctr, 'n|' .. dim, 1)
        if a.k == 1 then redis.call('HINCRBY', ctr, 'k|' .. dim, 1) end
      end
      n = n + 1
    end
  end
  return n
end

return redis.error_reply('unknown op ' .. tostring(op))
