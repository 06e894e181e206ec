"""The Redis Lua script that applies a batch of trend increments exactly once.

Kept as a Python string (not a .lua file) so it ships with the package however it is
installed; `TrendWriter` registers it with redis-py's `register_script` (EVALSHA).
"""

APPLY_BATCH_LUA = r"""
-- carstream: apply one batch of trend increments exactly once (see docs/trends.md).
--
-- KEYS[1]      the consumer group's applied-offset hash: field "<topic>:<partition>" -> offset
-- KEYS[2..n-2] the trend sorted sets this batch may touch, then the post_id "seen" keys
-- KEYS[n-1]    the group's retry sorted set: "<topic>:<partition>:<offset>" -> unix time, the
--              dead letters whose outcome a redelivery may change (see below)
-- KEYS[n]      the trends config hash (carstream:trends:config)
-- ARGV[1]      JSON [[field, [[offset, [key_index, member, ...], seen_index, retry], ...]], ...]
--              records of each partition in ascending offset order; key_index and seen_index
--              are 1-based into KEYS[2..n]; seen_index 0: no post_id dedup for this record;
--              retry 1: a dead letter of a kind that can turn out otherwise on a redelivery
-- ARGV[2]      JSON [expire_at, ...], unix seconds, one per trend key (KEYS[2..]); the seen
--              keys' entries are unused
-- ARGV[3]      TTL of a seen key, seconds (the post_id dedup window)
-- ARGV[4..5]   the writer's minute and hour bucket TTLs, recorded in KEYS[#KEYS] (the config
--              hash) whenever the batch counts something, so readers pick buckets by the TTLs
--              the buckets were written with, not their own settings
-- ARGV[6..8]   now (unix seconds), how long a retry entry is kept (seconds), and the most
--              entries the retry set keeps (the oldest go first)
--
-- A record at or below its partition's stored offset was applied before (a redelivery, or a
-- stalled replica that lost its partitions waking up late): it changes nothing, and its seen key
-- is not touched. A newer record with a seen key is counted only if SET NX creates that key (a
-- post re-sent by a producer, at a new offset, within the window is a duplicate). Either way the
-- partition's offset moves to the highest one, in the same atomic call.
--
-- The one exception to "at or below changes nothing": a dead letter whose kind can turn out
-- otherwise (a fetch that failed, a decode past its deadline) is noted in the retry set when
-- its offset is first applied. If a redelivery (a crash before the offset commit) classifies
-- it, its entry is removed and it is counted then, once, so the counts follow the result the
-- results topic got. Entries older than ARGV[7] are dropped.
-- Returns {applied, ignored, duplicates}.

local applied_key = KEYS[1]
local batch = cjson.decode(ARGV[1])
local expire_at = cjson.decode(ARGV[2])
local seen_ttl = tonumber(ARGV[3])
local retry_key = KEYS[#KEYS - 1]
local now = tonumber(ARGV[6])
local retry_ttl = tonumber(ARGV[7])
local retry_max = tonumber(ARGV[8])
local applied, ignored, duplicates = 0, 0, 0
local touched = {}
local retry_added = false

-- Redis keeps what a script wrote before an error: a ZINCRBY failing on the batch's fifth key
-- would leave the first four counted and the position unmoved, and every retry would count
-- them again. So every key the batch writes is checked before anything is written; a key of
-- the wrong type (written by something other than the workers) fails the call whole. (A seen
-- key of another type is harmless: SET NX finds it taken, and the record counts as a duplicate.)
local function wrong_type(key, want)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= want then
    return key .. ' holds a ' .. kind .. ', not a ' .. want
  end
  return nil
end
local problem = wrong_type(applied_key, 'hash') or wrong_type(KEYS[#KEYS], 'hash')
  or wrong_type(retry_key, 'zset')
local checked = {}
for _, part in ipairs(batch) do
  for _, rec in ipairs(part[2]) do
    local incs = rec[2]
    for i = 1, #incs, 2 do
      local idx = incs[i]
      if not problem and not checked[idx] then
        checked[idx] = true
        problem = wrong_type(KEYS[idx + 1], 'zset')
      end
    end
  end
end
if problem then
  return redis.error_reply(
    'WRONGTYPE carstream: ' .. problem .. '; nothing of this batch was applied'
  )
end

-- a record at a new offset, or a retried dead letter now classified: counted unless its
-- post_id was counted within the dedup window
local function count(rec)
  local seen = rec[3]
  if seen > 0 and not redis.call('SET', KEYS[seen + 1], '1', 'NX', 'EX', seen_ttl) then
    duplicates = duplicates + 1
    return
  end
  local incs = rec[2]
  for i = 1, #incs, 2 do
    local idx = incs[i]
    redis.call('ZINCRBY', KEYS[idx + 1], 1, incs[i + 1])
    touched[idx] = true
  end
  applied = applied + 1
end

redis.call('ZREMRANGEBYSCORE', retry_key, '-inf', string.format('(%d', now - retry_ttl))
local any_retry = redis.call('EXISTS', retry_key) == 1
for _, part in ipairs(batch) do
  local field = part[1]
  local stored = redis.call('HGET', applied_key, field)
  local position = -1
  if stored then
    position = tonumber(stored)
  end
  local start = position
  for _, rec in ipairs(part[2]) do
    local offset = rec[1]
    local entry = string.format('%s:%d', field, offset)
    if offset <= position then
      if #rec[2] > 0 and redis.call('ZREM', retry_key, entry) == 1 then
        count(rec)
      else
        ignored = ignored + 1
      end
    else
      count(rec)
      if rec[4] == 1 then
        redis.call('ZADD', retry_key, now, entry)
        retry_added = true
      elseif any_retry then
        -- a note left at this offset by an older life of the partition (a topic deleted and
        -- recreated, its applied position deleted as the docs say) must not count this record
        -- a second time when it is redelivered
        redis.call('ZREM', retry_key, entry)
      end
      position = offset
    end
  end
  if position > start then
    redis.call('HSET', applied_key, field, string.format('%d', position))
  end
end

local any_touched = false
for idx, _ in pairs(touched) do
  redis.call('EXPIREAT', KEYS[idx + 1], expire_at[idx])
  any_touched = true
end
if any_touched then
  redis.call('HSET', KEYS[#KEYS], 'minute_ttl_s', ARGV[4], 'hour_ttl_s', ARGV[5])
end
if retry_added then
  redis.call('ZREMRANGEBYRANK', retry_key, 0, -(retry_max + 1))
  redis.call('EXPIRE', retry_key, retry_ttl)
end

return {applied, ignored, duplicates}
"""
