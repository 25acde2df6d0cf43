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
PUBLISH_SCRIPT = """
local token = ARGV[8] or ''
if token ~= '' and redis.call('GET', KEYS[6]) ~= token then
  return redis.error_reply('NOTLEADER this ingest does not hold the leader lease')
end
local fence = ARGV[10] or ''
if fence ~= '' then
  local highest = redis.call('ZSCORE', KEYS[7], 'e')
  if highest and tonumber(fence) < tonumber(highest) then
    return redis.error_reply('NOTLEADER fencing epoch ' .. fence .. ' is below ' .. highest .. ' (a later leader)')
  end
  if not highest or tonumber(fence) > tonumber(highest) then
    redis.call('ZADD', KEYS[7], fence, 'e')
  end
end
local eid = ARGV[9] or ''
if eid ~= '' then
  local previous = redis.call('GET', KEYS[5])
  if previous and tonumber(eid) <= tonumber(previous) then
    return 0
  end
end
local epoch = redis.call('GET', KEYS[1])
local seq
if not epoch then
  -- First publication, or Redis lost the epoch: whatever seq, history or last value survived belongs to an
  -- epoch no gateway can tell apart any more, so start clean.
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  seq = redis.call('INCR', KEYS[2])
else
  seq = redis.call('INCR', KEYS[2])
  local floor = tonumber(ARGV[12] or '')
  if floor and ARGV[11] == epoch and seq > 1 and seq <= floor then
    -- This Redis lost writes this publisher was answered for (a promoted replica): never the same seq twice.
    -- (A seq key lost altogether, 1 here, starts a new epoch below, as it always did.)
    seq = floor + 1
    redis.call('SET', KEYS[2], string.format('%d', seq))
  elseif seq == 1 then
    -- The seq key was lost but the epoch survived: restarting at 1 in the same epoch would look like old
    -- messages to gateways, so move to a new (different) epoch and drop the old epoch's history.
    if epoch == ARGV[2] then
      epoch = string.format('%d', tonumber(epoch) % 2147483647 + 1)
    else
      epoch = ARGV[2]
    end
    redis.call('SET', KEYS[1], epoch)
    redis.call('DEL', KEYS[3], KEYS[4])
  end
end
local seqs = string.format('%d', seq)
local envelope = epoch .. ':' .. seqs .. ':' .. ARGV[3] .. ':' .. ARGV[4]
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], seqs .. '-0', 'e', envelope)
local ttl = tonumber(ARGV[7])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[3], ttl)
end
if ARGV[5] == '1' then
  redis.call('SET', KEYS[4], envelope)
end
if ARGV[13] == 'SPUBLISH' then
  redis.call('SPUBLISH', ARGV[1], envelope)
else
  redis.call('PUBLISH', ARGV[1], envelope)
end
if eid ~= '' then
  if ttl > 0 then
    redis.call('SET', KEYS[5], eid, 'PX', ttl)
  else
    redis.call('SET', KEYS[5], eid)
  end
end
return {tonumber(epoch), seq}
"""
PUBLISH_KEYS = 7  # how many of the publish script's arguments are KEYS when called with every check
NOT_LEADER = "NOTLEADER"  # the start of the publish script's refusal when the fencing token lost the lease
HISTORY_FIELD = b"e"  # the field of each history stream entry that holds the envelope
FENCE_MEMBER = b"e"  # the fence's one member; its score is the highest fencing epoch announced in the slot
