"""This supervisor's membership lease: join, renew, leave, all by Redis time and TTLs.

The lease key (:meth:`~core_bus.keys.StreamKeyBuilder.fleet_lease`) holds the
incarnation with ``PX lease_ttl``; the members-hash record is rewritten in the
same script as each renewal, and only while the key still holds our
incarnation: a supervisor whose lease lapsed was declared dead by the others
(its consumers may be reclaimed already) and must rejoin under a new
incarnation instead of quietly extending a lease someone else acted on.
Nothing here compares host clocks: ``started_ms`` and departure times are
Redis ``TIME``, expiry is Redis's own TTL.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.clock import redis_time_ms
from core_bus.streams.replies import text
from supervisor.membership.directory import REASON_LEFT
from supervisor.runtime.records import base36

#: Entries kept in the departed stream (approximately: MAXLEN ~).
DEPARTED_MAXLEN = 200

# KEYS: lease, members, departed; ARGV: name, incarnation, ttl_ms, record, maxlen.
# Returns the lease's previous value ("" when there was none). A record of an earlier
# incarnation whose lease is gone (we died or were cut off, and peers have not retired it
# yet) is closed with a departed entry before ours replaces it.
_JOIN = """
local previous = redis.call('GET', KEYS[1]) or ''
if previous == '' then
  local raw = redis.call('HGET', KEYS[2], ARGV[1])
  local ok, old = false, nil
  if raw then ok, old = pcall(cjson.decode, raw) end
  if ok and type(old) == 'table' and old.incarnation and old.incarnation ~= ARGV[2] then
    local function counts(v)
      if type(v) == 'table' and next(v) ~= nil then return cjson.encode(v) end
      return '{}'
    end
    local by = ''
    if type(old.reclaimed_by) == 'table' then by = table.concat(old.reclaimed_by, ',') end
    local reason = 'expired'
    if old.left then reason = 'left' end
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'name', ARGV[1],
      'incarnation', tostring(old.incarnation), 'reason', reason, 'at_ms', tostring(now),
      'reclaimed_by', by, 'reclaimed', counts(old.reclaimed),
      'pending_left', counts(old.pending_left),
      'note', 'rejoined before peers retired it; its start-up cleanup takes what is left')
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
return previous
"""
# KEYS: lease, members; ARGV: name, incarnation, ttl_ms, record -> 1 renewed, 0 lost
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
return 1
"""
# KEYS: lease, members, departed; ARGV: name, incarnation, pending_left json, keep, note
# keep = '1': entries are left pending, the record stays (lease gone) so peers reclaim them.
# Returns 1 when we still held the lease, 0 when it had lapsed (peers reclaim as for a death).
_LEAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then
  local raw = redis.call('HGET', KEYS[2], ARGV[1])
  if raw then
    local record = cjson.decode(raw)
    record.left = true
    redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(record))
  end
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'name', ARGV[1],
  'incarnation', ARGV[2], 'reason', 'left', 'at_ms', tostring(now), 'reclaimed_by', '',
  'reclaimed', '{}', 'pending_left', ARGV[3], 'note', ARGV[5])
return 1
"""




class MemberLease:
    """Join, renew and leave the fleet as ``name``; one incarnation per join."""

    def __init__(self, redis: AsyncRedis, keys: StreamKeyBuilder, name: str, ttl_ms: int) -> None:
        self._r = redis
        self.keys = keys
        self.name = name
        self.ttl_ms = ttl_ms
        self.incarnation = ""
        self.started_ms = 0
        self._lease = keys.fleet_lease(name)
        self._members = keys.fleet_members()
        self._join = redis.register_script(_JOIN)
        self._renew = redis.register_script(_RENEW)
        self._leave = redis.register_script(_LEAVE)

    def record(self, base: Mapping[str, Any]) -> str:
        """The members-hash JSON: ``base`` (host, pid, http, agents) plus identity."""
        record = dict(base)
        record.update(
            name=self.name,
            incarnation=self.incarnation,
            started_ms=self.started_ms,
            lease_ttl_ms=self.ttl_ms,
        )
        return json.dumps(record, separators=(",", ":"))

    async def join(self, base: Mapping[str, Any]) -> str:
        """Take the lease under a new incarnation; returns the lease's previous value.

        A previous value that is not empty means a run of the same name held
        the lease less than ``lease_ttl`` ago (a quick restart, or a second
        supervisor with our name: the caller logs it)."""
        now = await redis_time_ms(self._r)
        self.incarnation = f"{base36(now)}-{secrets.token_hex(2)}"
        self.started_ms = now
        previous = await self._join(
            keys=[self._lease, self._members, self.keys.fleet_departed()],
            args=[self.name, self.incarnation, self.ttl_ms, self.record(base), DEPARTED_MAXLEN],
        )
        return text(previous) if previous else ""

    async def renew(self, base: Mapping[str, Any]) -> bool:
        """Extend the lease and rewrite the record; False when the lease is no longer ours."""
        ok = await self._renew(
            keys=[self._lease, self._members],
            args=[self.name, self.incarnation, self.ttl_ms, self.record(base)],
        )
        return bool(int(ok))

    async def leave(self, pending_left: Mapping[str, int], note: str = "") -> bool:
        """Drop the lease now and record the departure (reason ``left``).

        With entries left pending the record stays in the hash (lease gone), so
        a live peer reclaims them at once; otherwise it is removed too. False
        when our lease had already lapsed (peers treat us as dead)."""
        keep = "1" if any(pending_left.values()) else "0"
        ok = await self._leave(
            keys=[self._lease, self._members, self.keys.fleet_departed()],
            args=[
                self.name,
                self.incarnation,
                json.dumps(dict(pending_left), separators=(",", ":")),
                keep,
                note,
                DEPARTED_MAXLEN,
            ],
        )
        return bool(int(ok))


__all__ = ["DEPARTED_MAXLEN", "REASON_LEFT", "MemberLease"]
