"""Several processes on ``torch.distributed``, launched by ``torchrun``: who does what.

elbolab runs unchanged under ``torchrun --nproc-per-node N elbolab ...``:
torchrun sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``,
and :func:`current` joins the process group (gloo on CPU, NCCL for CUDA
devices) with a timeout, so that a peer that dies makes the others fail
with a message instead of waiting for ever. Without those variables every
function here is the single-process identity.

Who does what: every rank computes, rank 0 alone writes files
(:func:`on_main` runs a step there and hands its outcome, or its error, to
every rank). Training averages nothing implicitly: each rank's loss is
scaled to its share of the global batch and the gradients are summed
(:func:`all_reduce_sum`), which equals the single-process gradient of that
batch. Each piece of a batch draws its random numbers from a seed of its
own (:func:`batch_seed`), so the numbers do not depend on which rank
computes it.

Evaluation is split the same way (:func:`map_units`): a data set's batches
(or an AIS run's pieces of chains) are units of work dealt round-robin to
the ranks, each unit seeded from ``--seed`` and its own index, and the
results of all units are gathered, in order, on every rank. Any number of
processes then gives the numbers of one process, bit for bit (with as many
threads per process: more threads may round a product differently).
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from tqdm.auto import tqdm

TIMEOUT_ENV = "ELBOLAB_DIST_TIMEOUT"  # seconds a collective may wait for a peer
DEFAULT_TIMEOUT = 300
# The random streams of evaluation's units of work, seeded (seed, stream, unit).
STREAM_IWAE, STREAM_AIS, STREAM_GAPS, STREAM_GAPS_WHOLE = range(4)


class DistributedError(RuntimeError):
    """A collective failed (a peer died or timed out); the message says which rank saw it."""


@dataclass(frozen=True)
class World:
    """A process's place among the processes of one job."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()  # one process, no process group


def current(device: str = "cpu") -> World:
    """The world of this process, joining the process group that torchrun describes.

    ``WORLD_SIZE`` unset or 1 is a single process. The backend is NCCL for a
    CUDA ``device``, else gloo; the timeout is ``ELBOLAB_DIST_TIMEOUT``
    seconds (default 300).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and "torch.distributed" not in sys.modules:
        return SINGLE  # not importing torch.distributed keeps every command's start-up short
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    if size <= 1:
        return SINGLE
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    dist.init_process_group(backend, timeout=timeout)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size())


def _dist():
    """``torch.distributed``, imported on first use (it brings torch._dynamo: 0.8 s)."""
    import torch.distributed

    return torch.distributed


def shutdown(*, wait: bool = False) -> None:
    """Leave the process group (at the end of a command).

    ``wait``: first wait for every rank to arrive (a command that succeeded),
    so that no rank closes its connections while another still uses them.
    """
    if "torch.distributed" not in sys.modules:
        return
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        if wait:
            _collective("waiting for every rank to finish", dist.barrier)
        dist.destroy_process_group()


def _collective(name: str, fn: Callable, *args):
    try:
        return fn(*args)
    except RuntimeError as err:  # gloo / NCCL errors: a peer died, or the wait timed out
        dist = _dist()
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"rank {rank}: {name} failed, a peer process died or did not answer within the "
            f"timeout ({first}); set {TIMEOUT_ENV} to wait longer"
        ) from None


def on_main(world: World, fn: Callable[[], object]):
    """``fn()`` on rank 0; its result, or its error as a one-line error, on every rank.

    For the steps only rank 0 may take (preparing the run directory, writing
    a report) that the other ranks must not run past, nor wait on for ever
    when rank 0 fails.
    """
    if not world.active:
        return fn()
    outcome: list = [None, None]
    if world.is_main:
        try:
            outcome = [fn(), None]
        except Exception as err:  # handed to every rank, then raised on rank 0 as it was
            outcome = [None, (type(err).__name__, str(err))]
            _collective("broadcasting an error", _dist().broadcast_object_list, outcome, 0)
            raise
    _collective("waiting for rank 0", _dist().broadcast_object_list, outcome, 0)
    if outcome[1] is not None:
        from .runs import RunError

        raise RunError(f"rank 0 stopped: {outcome[1][1]}")
    return outcome[0]


def agree(world: World, settings: dict[str, str]) -> None:
    """Raise :class:`DistributedError` on every rank unless all ranks hold the same ``settings``.

    Called before any work, so that hand-launched ranks with another ``--k``,
    ``--limit`` or ``--seed`` stop with one line naming the difference
    instead of mixing their numbers into one report.
    """
    if not world.active:
        return
    gathered: list = [None] * world.size
    _collective("comparing the ranks' settings", _dist().all_gather_object, gathered, settings)
    first = gathered[0]
    for rank, theirs in enumerate(gathered[1:], start=1):
        differ = [k for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k)]
        if differ:
            shown = "; ".join(
                f"--{k.replace('_', '-')}: rank 0 has {first.get(k)}, rank {rank} {theirs.get(k)}"
                for k in differ[:3]
            )
            raise DistributedError(
                f"the processes were launched with different settings ({shown}); launch every "
                "rank with the same command"
            )


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks in place, in one flat buffer (one message per call)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _collective("all_reduce", _dist().all_reduce, flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    for tensor in [*module.parameters(), *module.buffers()]:
        _collective("broadcast", _dist().broadcast, tensor.data, 0)


def my_pieces(world: World, size: int, shards: int) -> list[tuple[int, torch.Tensor]]:
    """The pieces of a batch of ``size`` rows that this rank computes.

    The batch is split into ``shards`` contiguous pieces, dealt round-robin
    to the ranks; each is returned as (piece number, row positions), empty
    pieces left out.
    """
    pieces = torch.tensor_split(torch.arange(size), shards)
    return [(s, pieces[s]) for s in range(world.rank, shards, world.size) if len(pieces[s])]


def batch_seed(seed: int, *index: int) -> int:
    """A seed for one unit of work (a piece of a training batch, an epoch's held-out pass).

    The same on every rank and in a single process, whichever rank does the
    work: the random numbers belong to the work, not to the process.
    """
    return int(torch.randint(2**62, (), generator=_seeded(seed, *index)))


def _seeded(seed: int, *index: int) -> torch.Generator:
    value = seed
    for i in index:
        value = (value * 1_000_003 + i + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def map_units(
    units: int,
    work: Callable[[int], object],
    *,
    seed: Sequence[int] | None,
    world: World | None = None,
    desc: str = "",
    progress: bool = True,
) -> list:
    """``[work(0), ..., work(units - 1)]``, the units shared among the ranks; on every rank.

    Unit ``u`` is computed by rank ``u % size`` only, after the global random
    state (torch, numpy, random) was seeded with ``batch_seed(*seed, u)``:
    its random numbers belong to the unit, so the list is the same for any
    number of processes. ``seed=None``: no re-seeding (for work that seeds
    a generator of its own).
    Results (nested dicts, lists, tuples and dataclasses of tensors) are
    kept as Python lists until the end (:func:`_pack`) and gathered with one
    ``all_gather_object``; tensors come back on the device they were on.
    """
    world = current() if world is None else world
    mine = range(world.rank, units, world.size)
    show = progress and world.is_main and len(mine) > 1
    done = []
    for u in tqdm(mine, desc=desc, disable=not show, leave=False):
        if seed is not None:
            seed_all(batch_seed(*seed, u))
        done.append(_pack(work(u)))
    if not world.active:
        return [_unpack(result) for result in done]
    gathered: list = [None] * world.size
    _collective("gathering results", _dist().all_gather_object, gathered, done)
    results: list = [None] * units
    for rank, theirs in enumerate(gathered):
        for u, result in zip(range(rank, units, world.size), theirs, strict=True):
            results[u] = _unpack(result)
    return results


def map_batches(
    data: torch.Tensor,
    batch_size: int,
    work: Callable[[torch.Tensor, int], object],
    **options,
) -> list:
    """:func:`map_units` over the batches of ``data``: ``work(batch, first row)`` for each."""
    units = -(-data.shape[0] // batch_size)
    return map_units(
        units, lambda u: work(data[u * batch_size : (u + 1) * batch_size], u * batch_size),
        **options,
    )  # fmt: skip


def seed_all(seed: int) -> None:
    """Seed torch, numpy and random (as ``pyro.set_rng_seed``, for seeds up to 2^63)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class _Packed:
    """A tensor's values as a Python list, its dtype, shape and device: see :func:`_pack`."""

    values: list
    dtype: torch.dtype
    shape: tuple
    device: str


def _pack(value):
    """Tensors in ``value`` (nested dicts, lists, tuples, dataclasses) as Python lists.

    A unit's results are small and live to the end, while its temporaries
    are large and short-lived: kept as tensors, the results sit between the
    freed temporaries on the C heap and keep it from being reused, and the
    process grows with every unit (evaluate on all 10,000 MNIST test images:
    702 MB against 366 MB on 1,000 with K = 50). As Python lists they live in
    Python's own memory. The values are exact (a float32 read as a Python
    float and back is the same number), and lists pickle for the gathering.
    """
    return _map_tensors(value, lambda t: _Packed(t.cpu().reshape(-1).tolist(), t.dtype,
                                                 tuple(t.shape), str(t.device)))  # fmt: skip


def _unpack(value):
    def unpack(p):
        return p if not isinstance(p, _Packed) else _tensor(p)

    return _map_tensors(value, unpack, kind=_Packed)


def _tensor(p: _Packed) -> torch.Tensor:
    return torch.tensor(p.values, dtype=p.dtype).reshape(p.shape).to(p.device)


def _map_tensors(value, fn, kind=torch.Tensor):
    if isinstance(value, kind):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn, kind) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_tensors(v, fn, kind) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _map_tensors(getattr(value, f.name), fn, kind)
                   for f in dataclasses.fields(value)}  # fmt: skip
        return dataclasses.replace(value, **changes)
    return value
