"""A rank that disappears mid-run: turn the failed collective into one message naming the lost rank.

The process groups get ``--distributed-timeout-minutes`` (Megatron-LM's flag): a collective waits
at most that long for a peer that hangs. A peer that dies is seen sooner where the transport
notices a closed connection (gloo: at once, "Connection closed by peer"); NCCL waits for the
timeout. Either way the surviving rank gets an exception in some collective, which does not say
which rank is gone. :func:`lost_rank_error` asks: every surviving rank that reaches it writes its
rank into the rendezvous store and waits a few seconds for the others; whoever did not answer is
named.
"""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

ROLL_CALL_KEY = "megatron_rift/alive/"
# Messages of a collective that lost its peer: gloo ("Connection closed by peer", "Timed out
# waiting ..."), NCCL's watchdog, torch's store ("Broken pipe").
COLLECTIVE_FAILURES = (
    "connection closed",
    "connection reset",
    "broken pipe",
    "timed out",
    "timeout",
    "nccl",
    "gloo",
)


class LostRankError(RuntimeError):
    """A collective failed because a rank is gone or stuck (the message names it)."""


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(words in text for words in COLLECTIVE_FAILURES)


def silent_ranks(wait_s: float) -> list[int] | None:
    """Ranks that did not write their roll-call key within ``wait_s`` seconds (None when the
    store itself is gone: it lives in rank 0 when there is no torchrun agent)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=max(wait_s, 1.0)))
        store.set(f"{ROLL_CALL_KEY}{dist.get_rank()}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [
                rank
                for rank in range(dist.get_world_size())
                if not store.check([f"{ROLL_CALL_KEY}{rank}"])
            ]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.2)
    except Exception:  # the store's host is gone too
        return None


def lost_rank_error(error: BaseException, timeout_minutes: float, step: int) -> LostRankError:
    wait_s = min(10.0, timeout_minutes * 60)
    silent = silent_ranks(wait_s)
    if silent is None:
        who = "rank 0 (it also held the rendezvous store, which is unreachable)"
    elif silent:
        who = f"rank(s) {', '.join(map(str, silent))} (no answer within {wait_s:g} s)"
    else:
        who = "no rank could be named (all answered the roll call)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    rank = dist.get_rank()
    return LostRankError(
        f"rank {rank} lost contact with {who} during step {step}: a collective failed "
        f"({first_line[:300]}). The run stops; restart it with the same --load to resume from "
        "the last checkpoint (--distributed-timeout-minutes bounds how long a collective waits)"
    )
