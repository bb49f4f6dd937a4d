"""Data parallelism on torch.distributed: what a trainer must sum or gather over its ranks so
that one step on a global batch split across them equals one single-process step on that
batch (up to floating-point reduction order).

Ranks are started by `torchrun` (gloo on CPU, NCCL on CUDA). Within a step the trainer sums
the gradients and the handful of batch statistics whose normalisers span the global batch
(token count, the AuxK denominator, the metrics' sums, the fired-latent counts), and
gathers the first batch once for the initialisation. `SINGLE` is the one-process case:
every operation is the identity, so the trainer has one code path.

Faults: the process group is joined with `--dist-timeout`; a collective whose peer died
(connection closed) or stayed silent that long raises, and `peers_watched` turns that into
`PeerLost`, which the commands print as one line before exiting 1 (never a hang).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import click
import torch
import torch.distributed as dist

from saestream.common.errors import UserError, error_line
from saestream.consumer.sharding import LatentShard

F = TypeVar("F", bound=Callable[..., Any])


class DataParallel:
    """Collectives over the data-parallel ranks of `group` (None = the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled and dist.is_available() and dist.is_initialized()
        self.group = group
        self.size = dist.get_world_size(group) if self.enabled else 1
        self.rank = dist.get_rank(group) if self.enabled else 0

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce SUM of `tensors` in place, as one flat message (one collective)."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
            offset += n

    def sum_grads_(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks (local losses are already divided by
        the global token count, so the sum is the global gradient)."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def finish(self) -> None:
        """Wait for every rank (e.g. for rank 0's snapshot), then leave the process group."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' row blocks [n_r, d], concatenated in rank order (n_r may differ)."""
        if self.size == 1:
            return x
        n = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(counts, n, group=self.group)
        most = int(max(int(c) for c in counts))
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


SINGLE = DataParallel(enabled=False)
"""One process: every collective is the identity."""


_joined: list[bool] = []


def joined_a_process_group() -> bool:
    """Whether this process joined a process group (`init_from_env`), even if it has left
    it since: the command line then ends it without the interpreter's teardown
    (`saestream.tools.cli`)."""
    return bool(_joined)


def launched_by_torchrun() -> bool:
    """True inside a process that torchrun (or any launcher setting its variables) started
    as one of several ranks."""
    return env_int("WORLD_SIZE", 1) > 1


def init_from_env(device: torch.device, timeout: float | None = None) -> DataParallel:
    """Join the process group torchrun described in the environment (NCCL for CUDA devices,
    gloo otherwise) and return the data-parallel view of it; SINGLE outside torchrun.
    `timeout` (seconds) bounds the rendezvous and every collective (PeerLost past it)."""
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        kw: dict[str, Any] = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
        try:
            kw.update(_attempt_store(timeout))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
            _joined.append(True)
        except RuntimeError as exc:  # the store timed out: a rank never came
            raise PeerLost(f"rank {os.environ.get('RANK', '?')} could not join the "
                           f"{os.environ.get('WORLD_SIZE')} ranks: {_reason(exc)}") from None
    return DataParallel()


@dataclass(frozen=True)
class Mesh:
    """The ranks as a 2-D mesh, data parallel × latent shards: consecutive ranks
    (`shard_size` of them) share a batch and split the latents; ranks with the same shard
    index form a data-parallel group."""

    world: DataParallel
    """Every rank (the step-boundary agreement, the split of a global batch's rows)."""
    dp: DataParallel
    """The data-parallel group: the ranks holding the same latents (gradients summed)."""
    shard_group: dist.ProcessGroup | None = None
    """The ranks sharing one batch and splitting the latents; None when not sharded."""
    shard_size: int = 1
    """Latent shards R (1: not sharded)."""

    @property
    def shard_rank(self) -> int:
        return self.world.rank % self.shard_size

    def shard(self, n_latents: int) -> LatentShard | None:
        """This rank's latents of an SAE with `n_latents` (None when not sharded)."""
        if self.shard_size == 1:
            return None
        return LatentShard.of_group(n_latents, self.shard_group)


SINGLE_MESH = Mesh(SINGLE, SINGLE)
"""One process."""


def mesh_from_env(device: torch.device, latent_shards: int = 1,
                  timeout: float | None = None) -> tuple[Mesh, torch.device]:
    """Under torchrun: join the process group (`init_from_env`) and lay the ranks out as a
    data-parallel × `latent_shards` mesh; the device becomes cuda:LOCAL_RANK when it is
    CUDA. Outside torchrun: one process, as asked. UserError for a shard count the world
    cannot hold."""

    if not launched_by_torchrun():
        if latent_shards > 1:
            raise UserError(f"--latent-shards {latent_shards} needs that many ranks: start "
                            "with torchrun --nproc-per-node N")
        return SINGLE_MESH, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    world = init_from_env(device, timeout)
    if world.size % latent_shards:
        raise UserError(f"--latent-shards {latent_shards} must divide the world size "
                        f"{world.size}")
    if latent_shards == 1:
        return Mesh(world, world), device
    kw = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    mine_dp = mine_shard = None
    for i in range(world.size // latent_shards):  # every rank creates every group, in order
        g = dist.new_group(list(range(i * latent_shards, (i + 1) * latent_shards)), **kw)
        if world.rank // latent_shards == i:
            mine_shard = g
    for j in range(latent_shards):
        g = dist.new_group(list(range(j, world.size, latent_shards)), **kw)
        if world.rank % latent_shards == j:
            mine_dp = g
    return Mesh(world, DataParallel(mine_dp), mine_shard, latent_shards), device


def _attempt_store(timeout: float | None) -> dict[str, Any]:
    """torchrun's agent store outlives a restart (`--max-restarts`), and the process group's
    keys in it are not per attempt: a restarted rank would read its dead predecessor's
    address. So under torchrun, the group's keys live under the attempt's own prefix."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in env:
        return {}
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout or 1800))
    store = dist.PrefixStore(f"saestream/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                             base)
    return {"store": store, "rank": env_int("RANK", 0, env),
            "world_size": env_int("WORLD_SIZE", 1, env)}


def env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    """A launcher's variable (WORLD_SIZE, RANK, LOCAL_RANK, ...) as a count >= 0; UserError,
    one line, when it is not one (a hand-set `WORLD_SIZE=abc` was a traceback)."""
    raw = (os.environ if env is None else env).get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"${name}={raw[:100]!r}: not a count (torchrun sets it; unset it "
                        "outside torchrun)")
    return value


def local_rank() -> int:
    return env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE; the world size if unset)."""
    return env_int("LOCAL_WORLD_SIZE", env_int("WORLD_SIZE", 1))


class PeerLost(Exception):
    """A collective failed: another rank died, or stayed silent beyond --dist-timeout. The
    message is one line, for the command to print before exiting 1."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a failed collective (gloo and NCCL raise RuntimeErrors that name
    themselves) rather than a bug of ours."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out"))


def _reason(exc: BaseException) -> str:
    """The gist of a c10d/gloo error: its first line, without the source-file prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


@contextmanager
def peers_watched(dp: DataParallel, timeout: float) -> Iterator[None]:
    """Turn a failed collective inside the block into PeerLost (one line naming the rank,
    the cause and --dist-timeout); other errors pass unchanged."""
    try:
        yield
    except RuntimeError as exc:
        if dp.size == 1 or not is_peer_failure(exc):
            raise
        raise PeerLost(f"rank {dp.rank} of {dp.size}: another rank is gone (it died, or was "
                       f"silent for --dist-timeout {timeout:g} s): {_reason(exc)}") from None


def peer_errors(func: F) -> F:
    """Wrap a command body run by torchrun ranks: PeerLost, or a collective that failed
    because a rank died or hung (its `dist_timeout` keyword names the limit), becomes one
    line on stderr and exit 1: never a traceback, never a hang."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PeerLost as exc:
            message = str(exc)
        except RuntimeError as exc:
            if not (dist.is_available() and dist.is_initialized() and is_peer_failure(exc)):
                raise
            timeout = kwargs.get("dist_timeout")
            message = (f"rank {dist.get_rank()} of {dist.get_world_size()}: another rank is "
                       f"gone (it died, or was silent for --dist-timeout {timeout:g} s): "
                       f"{_reason(exc)}")
        click.echo(error_line(message), err=True)
        sys.exit(1)

    return wrapper  # type: ignore[return-value]


class Agreement:
    """The ranks' one small collective per step boundary: an all-reduce MAX of a few
    integers (stop, snapshot, which hooks lack a batch), so every rank takes the same
    decision at the same step. On gloo, also when the trainers' collectives run on NCCL,
    so a lost peer raises here instead of waiting for NCCL's watchdog."""

    def __init__(self, dp: DataParallel) -> None:
        self.size = dp.size
        self.group = dp.group
        if self.size > 1 and dist.get_backend(dp.group) != "gloo":
            self.group = dist.new_group(backend="gloo")  # every rank, in the same order

    def max(self, values: Sequence[int]) -> list[int]:
        """The element-wise maximum of `values` over the ranks (identity in one process)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def rank_slice(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous part of `n` rows: sizes differ by at most one, earlier ranks
    take the extra rows, and the parts in rank order are the whole."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def rank_endpoints(bind: str, control_bind: str | None, rank: int, ranks: int
                   ) -> tuple[str, str | None]:
    """The data and control endpoints local rank `rank` of `ranks` binds (None: the data
    endpoint's own control endpoint, port + 1). One process: `bind` and `control_bind` as
    given. Several: a comma-separated list gives one endpoint per local rank; a single TCP
    `--bind` port P gives rank r the data port P + r (the contract: producers connect to
    P, P + 1, ...) and the control port P + W + 1 + r for W local ranks (after every data
    port, and past P + W, which is the last rank's data port + 1: no producer's default
    control endpoint reaches another rank's control socket); ipc/inproc paths get `-r<r>`
    appended (control: the data path + `.control`). UserError for a list of the wrong
    length."""
    from saestream.common.control import is_port_number
    from saestream.common.errors import UserError

    def pick(value: str, flag: str) -> str | None:
        parts = [p.strip() for p in value.split(",")]
        if len(parts) == 1:
            return None
        if len(parts) != ranks:
            raise UserError(f"{flag} lists {len(parts)} endpoints: give one per local rank "
                            f"({ranks}), or one endpoint"
                            + ("" if ranks > 1 else " (a list needs torchrun)"))
        return parts[rank]

    data = pick(bind, "--bind")
    if data is None and ranks > 1:
        scheme, _, rest = bind.partition("://")
        host, colon, port = rest.rpartition(":")
        if scheme == "tcp" and colon and is_port_number(port):
            data = f"tcp://{host}:{int(port) + rank}"
            if control_bind is None:
                control_bind = f"tcp://{host}:{int(port) + ranks + 1 + rank}"
                return data, control_bind
        else:
            data = f"{bind}-r{rank}"
    control = control_bind
    if control_bind is not None and control_bind != "off":
        control = pick(control_bind, "--control-bind")
        if control is None and ranks > 1:
            raise UserError("--control-bind under torchrun: give one endpoint per local rank "
                            "(comma-separated), `off`, or leave it out (each --bind + 1)")
        control = control or control_bind
    return data or bind, control
