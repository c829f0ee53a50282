"""The Lua scripts that make a worker's writes conditional on its heartbeat key; what each promises
is part of the Redis layout (`protos/redis_layout.py`).

Once a worker's heartbeat key has expired, other workers may claim its jobs and resume them from
their recorded progress. From then on the old worker must write nothing for those jobs, or the
client would see tokens twice: every write it makes to the shared streams goes through a script
that first checks the key, atomically, and the heartbeat never re-creates an expired key.
"""

from protos.redis_layout import DEAD_FIELDS, WORKER_STATUS_FIELD

_JOB, _REASON, _WORKER = DEAD_FIELDS

# KEYS[1] heartbeat. ARGV: status, ttl ms, "1" when registering a new consumer.
HEARTBEAT = f"""
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], '{WORKER_STATUS_FIELD}', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: heartbeat, requests stream, dead stream, then n_resp response streams, n_app progress keys
# to write to, n_del progress keys to delete.
# ARGV: group, responses maxlen, dead maxlen, progress ttl ms, field, worker, n_resp, n_app, n_del,
# n_dead, then n_resp payloads, n_app (byte offset, packed tokens) pairs, n_dead (job, reason) pairs,
# entry ids to ack. Progress is written at its offset, not appended, so a publish retried after a
# lost reply leaves it the same (and the gateway drops the chunks it already has, by index). Its
# TTL is set at the first token and renewed as the tokens enter each new page of 64 (256 bytes),
# not at every token: that would double the commands a generated token costs.
PUBLISH = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n_resp, n_app = tonumber(ARGV[7]), tonumber(ARGV[8])
local n_del, n_dead = tonumber(ARGV[9]), tonumber(ARGV[10])
local k, a = 4, 11
for _ = 1, n_resp do
  redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[2], '*', ARGV[5], ARGV[a])
  k, a = k + 1, a + 1
end
for _ = 1, n_app do
  local first = tonumber(ARGV[a])
  redis.call('SETRANGE', KEYS[k], first, ARGV[a + 1])
  local last = first + #ARGV[a + 1] - 1
  if first % 256 == 0 or math.floor(first / 256) ~= math.floor(last / 256) then
    redis.call('PEXPIRE', KEYS[k], ARGV[4])
  end
  k, a = k + 1, a + 2
end
for _ = 1, n_del do
  redis.call('DEL', KEYS[k])
  k = k + 1
end
for _ = 1, n_dead do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
    '{_JOB}', ARGV[a], '{_REASON}', ARGV[a + 1], '{_WORKER}', ARGV[6])
  a = a + 2
end
if a <= #ARGV then
  local ids = {{unpack(ARGV, a)}}
  redis.call('XACK', KEYS[2], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[2], unpack(ids))
end
return 1
"""

# KEYS: requests stream, the consumer's heartbeat. ARGV: group, consumer.
# Deletes a consumer only if it is dead and holds nothing: XGROUP DELCONSUMER drops its pending
# entries, so a job read between a check and the delete would otherwise be lost.
FORGET_CONSUMER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""
