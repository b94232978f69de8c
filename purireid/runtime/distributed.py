"""One process per GPU (DistributedDataParallel) on one node, and a no-op context for one process.

Whether to run distributed comes from the config alone (`train.gpus`), never from
environment variables such as SLURM_PROCID or RANK, which every SLURM job has.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    # A gloo group for host-side flags under NCCL (None: the default group already runs on the CPU).
    cpu_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order (sizes may differ)."""
        if not self.distributed:
            return tensor
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
        max_size = int(max(s.item() for s in sizes))
        padded = torch.zeros((max_size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)], dim=0)

    def all_gather_equal(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order, when all have the same
        shape (a step's share of the batch): no size exchange, nothing read back to the host."""
        if not self.distributed:
            return tensor
        out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous())
        return out

    def any_true(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (so all ranks take the same branch).
        Exchanged on the CPU (gloo), so checking it between steps never waits for the GPU."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (float64), the same on every rank."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP broadcasts them only at the start of a forward through the DDP wrapper; after the
        last training step each rank holds the statistics of its own share of the batch, so
        anything that uses the bare model afterwards (eval-mode extraction) syncs first.
        """
        if not self.distributed:
            return
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items (rank order = item order)."""
        per_rank = -(-n // self.world_size)
        start = min(n, self.rank * per_rank)
        return range(start, min(n, start + per_rank))


def unwrapped(net: torch.nn.Module) -> torch.nn.Module:
    """The model inside what the steps run: torch.compile's and DistributedDataParallel's wrappers removed."""
    net = getattr(net, "_orig_mod", net)  # torch.compile
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


def per_process_bn_groups(bn_groups: int, world_size: int) -> int:
    """BN groups inside one process: the global `bn_groups` shared among the processes."""
    return max(1, bn_groups // world_size)


class DeviceUnavailable(RuntimeError):
    """A CUDA device was asked for where torch sees none."""


def resolve_device(name: str | torch.device, *, setting: str = "config key 'device'") -> torch.device:
    """`auto` picks CUDA when visible; asking for CUDA (`cuda`, `cuda:1`) without one raises
    DeviceUnavailable naming `setting`, where the user asked for it (a config key, a CLI option)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"{setting} is {str(name)!r} but no CUDA device is visible to this job (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); use auto or cpu, or run the job on a GPU node "
            "(`purireid doctor` there says what torch sees)"
        )
    return device


def usable_cpus() -> int:
    """CPU cores this process may run on (the SLURM/cgroup allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parent_logging() -> tuple[str | None, int] | None:
    """(log file, level) of the parent's purireid logger, when setup_logging configured it."""
    from purireid.log import LOGGER_NAME

    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        return None
    files = [h.baseFilename for h in logger.handlers if isinstance(h, logging.FileHandler)]
    return (files[0] if files else None, logger.level)


def _worker(rank: int, world_size: int, device_name: str, port: int, log_setup: tuple[str | None, int] | None,
            fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    if log_setup is not None:  # spawned children start with bare logging: rank 0 logs like the parent
        from purireid.log import setup_logging

        log_file, level = log_setup
        if rank == 0:
            setup_logging(log_file, level)
        else:
            setup_logging(None, max(level, logging.WARNING))
    base = resolve_device(device_name)
    # The processes share the job's cores: an equal share each avoids oversubscription.
    torch.set_num_threads(max(1, usable_cpus() // world_size))
    if base.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    try:
        fn(*args, ctx=DistContext(rank, world_size, device, cpu_group), **kwargs)
    finally:
        dist.destroy_process_group()


def check_devices(world_size: int, device: str) -> torch.device:
    """The base device for `world_size` processes; a clear error naming the config key otherwise."""
    if world_size > 1 and device in ("auto", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"config key 'train.gpus' is {world_size} (one process per GPU) and 'device' is {device!r}, "
            "but no CUDA device is visible to this job; request the GPUs for the rule (resources gpu / "
            "SLURM --gpus), or set train.gpus: 1, or device: cpu to run the processes on the CPU (gloo)"
        )
    base = resolve_device(device)
    if world_size > 1 and base.type == "cuda" and torch.cuda.device_count() < world_size:
        raise RuntimeError(
            f"config key 'train.gpus' asks for {world_size} GPUs but {torch.cuda.device_count()} are "
            "visible; request that many GPUs for the rule (resources gpu / SLURM gres) or lower train.gpus"
        )
    return base


def launch(fn: Callable[..., Any], *args: Any, world_size: int, device: str, **kwargs: Any) -> None:
    """Run `fn(*args, ctx=DistContext, **kwargs)` in `world_size` processes (or in this one).

    SIGTERM/SIGINT sent to this (parent) process alone -- SLURM, snakemake, a user -- is
    forwarded to the children, whose training loop stops at the same step on every rank
    with the last epoch's state kept; the parent waits for them and exits with status 143
    (130 for SIGINT).
    """
    base = check_devices(world_size, device)
    if world_size <= 1:
        fn(*args, ctx=DistContext(0, 1, base), **kwargs)
        return
    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(world_size, device, _free_port(), _parent_logging(), fn, args, kwargs),
                                 nprocs=world_size, join=False, start_method="spawn")
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for process in context.processes:
            if process.is_alive():
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, forward)
        except ValueError:  # not the main thread
            pass
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException:
        if not received:
            raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise SystemExit(130 if received[0] == signal.SIGINT else 143)
