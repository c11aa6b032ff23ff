"""Multi-process coordination: the one module that knows which rank it runs on.

Under `accelerate launch` (DDP, FSDP2, DeepSpeed) every process runs the same command.
Everywhere else in sftmix the rule is: one rank decides and writes, every rank waits at
the boundary, and an error raised on the deciding rank is raised on every rank, so all
exit non-zero together (the launcher ends the others when one rank dies elsewhere).

    world_size(), rank(), is_main()
    on_main(fn, ...)   rank 0 runs fn; every rank returns its result or raises its error
    barrier()
    gather(obj)        every rank's obj, in rank order, on every rank
    shard(count)       the indices of `range(count)` this rank handles (strided)

One process (no launcher) is the trivial case: nothing is initialised, nothing waits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import InputError

T = TypeVar("T")


def world_size() -> int:
    """Processes in this job: WORLD_SIZE set by the launcher, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _process_group():
    """The default process group, initialised through accelerate when the launcher has not done it yet."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()  # reads the launcher's environment (backend, device) and calls init_process_group
    return dist


def barrier() -> None:
    if world_size() > 1:
        _process_group().barrier()


def gather(obj: Any) -> list[Any]:
    """All ranks' `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    dist = _process_group()
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    holder = [obj if is_main() else None]
    _process_group().broadcast_object_list(holder, src=0)
    return holder[0]


class FailedOnMain(RuntimeError):
    """Raised on the other ranks when rank 0 failed in `on_main`; rank 0 reports the error itself."""

    quiet = True  # the CLI prints nothing for it: rank 0 already printed the one message


class InputFailedOnMain(InputError):
    """An InputError of rank 0, raised on the other ranks (same exit status 2, printed once)."""

    quiet = True


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 only; every rank returns its (picklable) result or raises its error."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except InputError as err:
            broadcast(("input_error", str(err)))
            raise
        except BaseException as err:
            broadcast(("error", f"{type(err).__name__}: {err}"))
            raise
    kind, value = broadcast(outcome)
    if kind == "input_error":
        raise InputFailedOnMain(value)
    if kind == "error":
        raise FailedOnMain(f"rank 0 failed: {value}")
    return value


def shard(count: int) -> range:
    """This rank's indices of `range(count)`: every world_size-th, starting at its rank."""
    return range(rank(), count, world_size())
