"""The Lua scripts pricegate runs inside Redis, and the contract each keeps with its callers: their KEYS and ARGV,
what they return, and the errors and field names callers match on. Today that is the publish script, which makes a
message's sequencing, history, last value and PUBLISH one atomic server-side step (docs/architecture.md, "The
Redis wire contract")."""

from __future__ import annotations

# KEYS: epoch, seq, history, last, event id, ingest leader lease, fence. ARGV: channel, candidate epoch,
# published_at_ms, payload, keep_last (0/1), history maxlen, history TTL in ms (0 = none), fencing token ('' = not
# checked against the lease), event identity ('' = none), fencing epoch ('' = not checked against the fence), floor
# epoch and floor seq (the last (epoch, seq) this publisher was answered for the stream; '' = none), publish command
# ('SPUBLISH' on a cluster, else PUBLISH). Returns {epoch, seq}, or 0 for a duplicate event (nothing written), or a
# NOTLEADER error when the fencing token does not hold the lease or the fencing epoch is below the fence (nothing
# written).
# The envelope is built exactly like shared.frames.encode_publication: b"%d:%d:%d:%b".
# Fencing lives here, not in the caller: checked in the same atomic step as the write, an ingest paused or cut off
# after it lost the lease cannot publish even once, whatever it still believes. Two checks, each used where it can
# be: the token against the lease key (one Redis: standalone and Sentinel), and the fencing epoch against the
# fence, a key of the stream's own slot (a cluster script may touch only one slot, and the lease lives in another).
# The fence is a sorted set whose member 'e' scores the highest fencing epoch announced in the slot: every leader
# raises it in every slot before it publishes (ZADD GT), and a script given a higher epoch raises it too; a lower
# one is refused. Epochs come from the lease (ingest.publish.leader): each acquisition gets a higher one.
# The floor: a failover may promote a replica that missed the last writes, so the stored seq can be below one this
# publisher was already answered; handing that seq out again in the same epoch would make gateways drop the new
# message as a duplicate. The script moves the seq past the floor instead, and gateways count the lost ones as a gap.
# The event identity (Lua numbers are doubles: exact below 2^53, far above Binance's ids and millisecond times)
# survives a change of ingest process, so the new leader's overlap with the old one is dropped here even though it
# never saw the old one's.
# Called with only the first 4 keys and 7 arguments (the load generator, tests), it publishes unfenced and
# without a duplicate filter, as before those were added; with 6 keys and 9 arguments, as before the fence.
# The part every publication runs, after the lease and fence checks, as one Lua function shared by the
# one-message script and the batch script below (so the two cannot drift apart): returns epoch, seq, or nothing for
# a duplicate event.
_PUBLISH_ONE = """
local function publish_one(k_epoch, k_seq, k_history, k_last, k_eid, channel, candidate, published_at, payload,
                           keep_last, maxlen, ttl, eid, floor_epoch, floor_seq, command)
  if eid ~= '' then
    local previous = redis.call('GET', k_eid)
    if previous and tonumber(eid) <= tonumber(previous) then
      return nil
    end
  end
  local epoch = redis.call('GET', k_epoch)
  local seq
  if not epoch then
    -- First publication, or Redis lost the epoch: whatever seq, history or last value survived belongs to an
    -- epoch no gateway can tell apart any more, so start clean.
    epoch = candidate
    redis.call('SET', k_epoch, epoch)
    redis.call('DEL', k_seq, k_history, k_last)
    seq = redis.call('INCR', k_seq)
  else
    seq = redis.call('INCR', k_seq)
    local floor = tonumber(floor_seq or '')
    if floor and floor_epoch == epoch and seq > 1 and seq <= floor then
      -- This Redis lost writes this publisher was answered for (a promoted replica): never the same seq twice.
      -- (A seq key lost altogether, 1 here, starts a new epoch below, as it always did.)
      seq = floor + 1
      redis.call('SET', k_seq, string.format('%d', seq))
    elseif seq == 1 then
      -- The seq key was lost but the epoch survived: restarting at 1 in the same epoch would look like old
      -- messages to gateways, so move to a new (different) epoch and drop the old epoch's history.
      if epoch == candidate then
        epoch = string.format('%d', tonumber(epoch) % 2147483647 + 1)
      else
        epoch = candidate
      end
      redis.call('SET', k_epoch, epoch)
      redis.call('DEL', k_history, k_last)
    end
  end
  local seqs = string.format('%d', seq)
  local envelope = epoch .. ':' .. seqs .. ':' .. published_at .. ':' .. payload
  redis.call('XADD', k_history, 'MAXLEN', '~', maxlen, seqs .. '-0', 'e', envelope)
  if ttl > 0 then
    redis.call('PEXPIRE', k_history, ttl)
  end
  if keep_last == '1' then
    redis.call('SET', k_last, envelope)
  end
  if command == 'SPUBLISH' then
    redis.call('SPUBLISH', channel, envelope)
  else
    redis.call('PUBLISH', channel, envelope)
  end
  if eid ~= '' then
    if ttl > 0 then
      redis.call('SET', k_eid, eid, 'PX', ttl)
    else
      redis.call('SET', k_eid, eid)
    end
  end
  return tonumber(epoch), seq
end
"""

# The lease and fence checks, once per script call: token and fencing epoch ('' = not checked), lease and fence keys.
_FENCING = """
local function refused(token, fence, k_lease, k_fence)
  if token ~= '' and redis.call('GET', k_lease) ~= token then
    return redis.error_reply('NOTLEADER this ingest does not hold the leader lease')
  end
  if fence ~= '' then
    local highest = redis.call('ZSCORE', k_fence, 'e')
    if highest and tonumber(fence) < tonumber(highest) then
      return redis.error_reply('NOTLEADER fencing epoch ' .. fence .. ' is below ' .. highest .. ' (a later leader)')
    end
    if not highest or tonumber(fence) > tonumber(highest) then
      redis.call('ZADD', k_fence, fence, 'e')
    end
  end
  return nil
end
"""

PUBLISH_SCRIPT = (
    _FENCING
    + _PUBLISH_ONE
    + """
local refusal = refused(ARGV[8] or '', ARGV[10] or '', KEYS[6], KEYS[7])
if refusal then
  return refusal
end
local epoch, seq = publish_one(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                               ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[9] or '', ARGV[11], ARGV[12], ARGV[13])
if not epoch then
  return 0
end
return {epoch, seq}
"""
)

# The batch form, for one Redis server (a cluster script may touch one slot only, so a cluster publishes message by
# message): many publications in one call, each exactly as PUBLISH_SCRIPT would make it, with the lease and the
# fence checked once for all of them. Redis' own cost per call (finding the script, building KEYS and ARGV,
# entering Lua, the checks) is then paid once per batch instead of once per message (BENCHMARKS.md, "Ingest
# firehose").
# KEYS: lease, fence, then 5 per message (epoch, seq, history, last, event id). ARGV: 7 for the batch (candidate
# epoch, published_at_ms, history maxlen, history TTL in ms, fencing token, fencing epoch, publish command), then 6
# per message (channel, payload, keep_last, event identity, floor epoch, floor seq), each meaning what it means for
# PUBLISH_SCRIPT. Returns a NOTLEADER error and writes nothing when the checks refuse; else an array of two integers
# per message, epoch and seq, or 0 and 0 for a duplicate. A message whose commands fail (a key of the wrong type)
# ends the batch: the array then ends with that message's error, and the messages after it were not run, so the
# caller knows exactly which were published.
PUBLISH_BATCH_SCRIPT = (
    _FENCING
    + _PUBLISH_ONE
    + """
local refusal = refused(ARGV[5], ARGV[6], KEYS[1], KEYS[2])
if refusal then
  return refusal
end
local out = {}
local ttl = tonumber(ARGV[4])
for i = 0, (#KEYS - 2) / 5 - 1 do
  local k = 2 + 5 * i
  local a = 7 + 6 * i
  local ok, epoch, seq = pcall(publish_one, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5],
                               ARGV[a + 1], ARGV[1], ARGV[2], ARGV[a + 2], ARGV[a + 3], ARGV[3], ttl, ARGV[a + 4],
                               ARGV[a + 5], ARGV[a + 6], ARGV[7])
  if not ok then
    -- The error as the one-message script would answer it: pcall hands over a string (a table on some
    -- versions) that already starts with its code (WRONGTYPE, OOM, READONLY); only a bare message gets ERR.
    local message = tostring(type(epoch) == 'table' and epoch.err or epoch)
    if not string.find(message, '^%u[%u_]* ') then
      message = 'ERR ' .. message
    end
    out[#out + 1] = redis.error_reply(message)
    return out
  end
  out[#out + 1] = epoch or 0
  out[#out + 1] = seq or 0
end
return out
"""
)
BATCH_KEYS = 2  # the batch script's KEYS before the per-message ones (lease, fence)
BATCH_ARGS = 7  # the batch script's ARGV before the per-message ones
BATCH_KEYS_PER_MESSAGE = 5
BATCH_ARGS_PER_MESSAGE = 6
PUBLISH_KEYS = 7  # how many of the publish script's arguments are KEYS when called with every check
NOT_LEADER = "NOTLEADER"  # the start of the publish script's refusal when the fencing token lost the lease
HISTORY_FIELD = b"e"  # the field of each history stream entry that holds the envelope
FENCE_MEMBER = b"e"  # the fence's one member; its score is the highest fencing epoch announced in the slot
