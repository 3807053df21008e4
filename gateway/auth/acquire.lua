-- Admit one request against a key's limits, atomically (RedisRateLimiter.acquire).
-- KEYS: requests hash, tokens hash, concurrency zset.
-- ARGV: rpm, tpm, max_concurrent (0 = unlimited), est_tokens, bucket_ms, n_buckets,
--       lease_ttl_ms, lease_id. Returns {admitted, bucket | retry_after_ms, reason}.
local rkey, tkey, ckey = KEYS[1], KEYS[2], KEYS[3]
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local est, bucket_ms, nb = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl_ms, lease = tonumber(ARGV[7]), ARGV[8]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = math.floor(now / bucket_ms)
local oldest = b - nb + 1
local function window(key)
  local flat = redis.call('HGETALL', key)
  local buckets, total = {}, 0
  for i = 1, #flat, 2 do
    local bk, v = tonumber(flat[i]), tonumber(flat[i + 1])
    if bk < oldest then
      redis.call('HDEL', key, flat[i])
    else
      buckets[#buckets + 1] = {bk, v}
      total = total + v
    end
  end
  table.sort(buckets, function(x, y) return x[1] < y[1] end)
  return buckets, total
end
local function retry(buckets, total, need, limit)
  local acc = 0
  for _, e in ipairs(buckets) do
    acc = acc + e[2]
    if total - acc + need <= limit then
      return math.max(0, (e[1] + nb) * bucket_ms - now)
    end
  end
  return nb * bucket_ms
end
if rpm > 0 then
  local rb, rt = window(rkey)
  if rt + 1 > rpm then return {0, retry(rb, rt, 1, rpm), 'rpm'} end
end
if tpm > 0 then
  if est > tpm then return {0, nb * bucket_ms, 'tpm_too_large'} end
  local tb, tt = window(tkey)
  if tt + est > tpm then return {0, retry(tb, tt, est, tpm), 'tpm'} end
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', ckey, '-inf', now)
  if redis.call('ZCARD', ckey) >= maxc then return {0, 1000, 'concurrency'} end
  redis.call('ZADD', ckey, now + ttl_ms, lease)
  redis.call('PEXPIRE', ckey, ttl_ms)
end
local keep_ms = (nb + 1) * bucket_ms
if rpm > 0 then
  redis.call('HINCRBY', rkey, b, 1)
  redis.call('PEXPIRE', rkey, keep_ms)
end
if tpm > 0 then
  redis.call('HINCRBY', tkey, b, est)
  redis.call('PEXPIRE', tkey, keep_ms)
end
return {1, b, 'ok'}
