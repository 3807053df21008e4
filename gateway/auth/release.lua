-- Release a lease: free its concurrency slot, correct its tokens (RedisRateLimiter).
-- KEYS: tokens hash, concurrency zset. ARGV: lease_id, bucket, token delta.
redis.call('ZREM', KEYS[2], ARGV[1])
local delta = tonumber(ARGV[3])
if delta ~= 0 and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[1], ARGV[2], delta) < 0 then
    redis.call('HSET', KEYS[1], ARGV[2], 0)
  end
end
return 1
