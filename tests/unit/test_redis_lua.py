"""Which Redis errors mean "retry later" (the batch loop backs off) and which mean a bad record
(the DLQ): the replies as redis-py's own parser turns them into exceptions."""

from __future__ import annotations

import pytest
from redis import exceptions as rex
from redis.connection import DefaultParser

from stream.redis_io import is_transient_redis_error

# replies a healthy record can meet while Redis cannot take writes for a while
TRANSIENT = [
    "OOM command not allowed when used memory > 'maxmemory'. script: 3b9f8fd4, on @user_script:24.",
    "LOADING Redis is loading the dataset in memory",
    "READONLY You can't write against a read only replica. script: 3b9f8fd4, on @user_script:24.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "MOVED 3999 127.0.0.1:6381",
    "ASK 3999 127.0.0.1:6381",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.",
    "NOREPLICAS Not enough good replicas to write.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    "ERR max number of clients reached",
    # Redis 6 quotes a refusal met by redis.call inside a script in an ERR
    "ERR Error running script (call to f_3b9f8fd4): @user_script:24: @user_script: 24: -OOM command not allowed "
    "when used memory > 'maxmemory'.",
]

# replies that are about the call itself: retrying would not help
PERMANENT = [
    "ERR Error running script (call to f_3b9f8fd4): @user_script:3: user_script:3: bad argument #1 to 'tonumber'",
    "ERR user_script:12: Script attempted to access nonexistent global variable 'x' script: 3b9f8fd4",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "BUSYKEY Target key name already exists.",
    "NOPERM this user has no permissions to run the 'evalsha' command",
    "ERR wrong number of arguments for 'evalsha' command",
    "NOSCRIPT No matching script. Please use EVAL.",  # reloaded by LuaScript, never a retry of the batch
]


@pytest.mark.parametrize("reply", TRANSIENT)
def test_a_refusal_that_goes_away_is_transient(reply: str) -> None:
    assert is_transient_redis_error(DefaultParser.parse_error(reply))


@pytest.mark.parametrize("reply", PERMANENT)
def test_an_error_about_the_call_is_not(reply: str) -> None:
    assert not is_transient_redis_error(DefaultParser.parse_error(reply))


def test_client_side_failures_are_transient_and_bugs_are_not() -> None:
    assert is_transient_redis_error(rex.ConnectionError("Error 111 connecting to localhost:6379. Connection refused."))
    assert is_transient_redis_error(rex.TimeoutError("Timeout reading from socket"))
    assert is_transient_redis_error(rex.SlotNotCoveredError("no node serves slot 12"))
    assert is_transient_redis_error(ConnectionResetError())
    assert not is_transient_redis_error(rex.DataError("Invalid input of type: 'dict'"))
    assert not is_transient_redis_error(ValueError("BUSY "))  # only Redis' own replies are read by their code
