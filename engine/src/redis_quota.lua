-- state::quota_take in Redis: KEYS[1] the bucket; ARGV now (ms), limit, per (us), reserve (0/1).
-- Returns when the taker may go, in ms. The key expires once the bucket is full again.
local now_us = tonumber(ARGV[1]) * 1000
local limit = tonumber(ARGV[2])
local per_us = tonumber(ARGV[3])
local reserve = ARGV[4] == '1'
local interval_us = math.max(math.floor(per_us / limit), 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now_us then tat = now_us end
local at_us = tat - (per_us - interval_us)
if at_us > now_us and not reserve then
  return math.ceil(at_us / 1000)
end
local next_tat = tat + interval_us
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now_us) / 1000) + 1)
return math.ceil(math.max(at_us, now_us) / 1000)
