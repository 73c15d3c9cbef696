"""Data parallelism under `torchrun`: process-group setup, sharding of global batches, reductions.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; without them (one process)
every helper here is a no-op, so one trainer serves one process and many. Backends: gloo on CPU,
nccl on CUDA. Only rank 0 talks to MLflow; what the other ranks need from it (a resume checkpoint,
a failure before training) is broadcast as bytes, and checkpoints are read back with
`weights_only=True`, so no rank ever unpickles anything.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from picollm.errors import PicollmError
from picollm.runtime.hardware import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (nccl needs CUDA)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """Rows of a global batch of n that this rank trains on (strided, so lengths stay balanced)."""
        return slice(self.rank, n, self.world_size)


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise PicollmError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def refuse_under_torchrun(flow: str) -> None:
    """Flows without DDP support say so instead of running N independent copies."""
    if (n := env_world_size()) > 1:
        raise PicollmError(f"{flow} does not support torchrun/DDP (WORLD_SIZE={n}); run it as one process")


def setup(device_name: str, timeout_s: float = 600.0) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = env_world_size()
    device = resolve_device(device_name)
    if world <= 1:
        return DistContext(device=device), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise PicollmError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise PicollmError(f"DDP runs on cpu (gloo) or cuda (nccl), not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    return DistContext(rank, world, local_rank, backend, device), device


def teardown(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group: free what still holds gloo work (a DDP reducer kept alive by a reference
    cycle would otherwise be destroyed during interpreter shutdown, after the group, and abort the process:
    "terminate called without an active exception"), then, after a `clean` run, wait until every rank is
    done with collectives, and destroy the group while the interpreter is fully alive. After a failure
    there is no barrier: the other ranks may be stuck in a collective this rank will never join."""
    if not (ctx.enabled and dist.is_initialized()):
        return
    gc.collect()
    if clean:
        try:
            dist.barrier()
        except Exception as e:  # a rank already gone: destroying the group is still the right thing
            log.warning("barrier before leaving the process group failed: %s", e)
    dist.destroy_process_group()


def all_reduce_sum(ctx: DistContext, *values: torch.Tensor | float) -> list[float]:
    """Sum scalars over ranks (one collective for all of them)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True if `flag` is true on any rank (so every rank takes the same branch)."""
    if not ctx.enabled:
        return flag
    return all_reduce_sum(ctx, float(flag))[0] > 0


def broadcast_bytes(ctx: DistContext, payload: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (length first, then the data)."""
    if not ctx.enabled:
        return payload or b""
    n = torch.tensor([len(payload or b"") if ctx.is_main else 0], dtype=torch.int64, device=ctx.device)
    dist.broadcast(n, src=0)
    if ctx.is_main:
        buf = torch.frombuffer(bytearray(payload or b"\0"), dtype=torch.uint8)[: int(n)].to(ctx.device)
    else:
        buf = torch.empty(int(n), dtype=torch.uint8, device=ctx.device)
    if int(n):
        dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy().tobytes())


def broadcast_json(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's JSON-able object (e.g. evaluation metrics) on every rank."""
    if not ctx.enabled:
        return obj
    raw = broadcast_bytes(ctx, json.dumps(obj).encode() if ctx.is_main else None)
    return json.loads(raw.decode())


def broadcast_checkpoint(ctx: DistContext, ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rank 0's checkpoint on every rank, serialised with torch.save and read back weights-only."""
    if not ctx.enabled:
        return ckpt
    if ctx.is_main:
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        payload = buf.getvalue()
    else:
        payload = None
    raw = broadcast_bytes(ctx, payload)
    return ckpt if ctx.is_main else torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def share_failure(ctx: DistContext, error: BaseException | None) -> None:
    """Rank 0 tells the others whether its MLflow-side preparation failed, so no rank waits forever in
    a collective that rank 0 will never join; every rank then raises (rank 0 its own exception)."""
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    message = broadcast_bytes(ctx, (str(error) or type(error).__name__).encode() if error is not None else b"")
    if error is not None:
        raise error
    if message:
        raise PicollmError(f"rank 0 failed: {message.decode()}")
