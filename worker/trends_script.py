"""The Redis Lua script that applies a batch of trend increments exactly once.

Kept as a Python string (not a .lua file) so it ships with the package however it is
installed; `TrendWriter` registers it with redis-py's `register_script` (EVALSHA).
"""

APPLY_BATCH_LUA = r"""
-- carstream: apply one batch of trend increments exactly once (see docs/trends.md).
--
-- KEYS[1]      the consumer group's applied-offset hash: field "<topic>:<partition>" -> offset
-- KEYS[2..n]   the trend sorted sets this batch may touch
-- ARGV[1]      JSON [[field, [[offset, [key_index, member, key_index, member, ...]], ...]], ...]
--              records of each partition in ascending offset order; key_index is 1-based
--              into KEYS[2..n]
-- ARGV[2]      JSON [expire_at, ...], unix seconds, one per KEYS[2..n]
--
-- A record at or below its partition's stored offset was applied before (a redelivery, or a
-- stalled replica that lost its partitions waking up late): it changes nothing. The others
-- are counted and the partition's offset moves to the highest one, in the same atomic call.
-- Returns {applied, ignored}.

local applied_key = KEYS[1]
local batch = cjson.decode(ARGV[1])
local expire_at = cjson.decode(ARGV[2])
local applied, ignored = 0, 0
local touched = {}

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
    if offset <= position then
      ignored = ignored + 1
    else
      local incs = rec[2]
      for i = 1, #incs, 2 do
        local idx = incs[i]
        redis.call('ZINCRBY', KEYS[idx + 1], 1, incs[i + 1])
        touched[idx] = true
      end
      position = offset
      applied = applied + 1
    end
  end
  if position > start then
    redis.call('HSET', applied_key, field, string.format('%d', position))
  end
end

for idx, _ in pairs(touched) do
  redis.call('EXPIREAT', KEYS[idx + 1], expire_at[idx])
end

return {applied, ignored}
"""
