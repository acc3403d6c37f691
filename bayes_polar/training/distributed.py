r"""Multi-process training on ``torch.distributed``: one replica per process, gradients averaged.

``torchrun --nproc_per_node R -m bayes_polar.cli fit ...`` starts R processes; each calls
:func:`init_distributed` (backend ``gloo`` on CPU, ``nccl`` when CUDA is available; the device
comes from ``LOCAL_RANK``), trains the same method on its shard of every global minibatch and
averages gradients before every optimiser step, as ``DistributedDataParallel`` does:

.. math::
    g = \frac1R \sum_{r=1}^{R} \nabla \mathcal L_r, \qquad
    \mathcal L_r = -\Big(\frac{N}{b} \sum_{t \in \text{shard}_r} \mathbb E_q[\log p(y_t \mid \phi_t, W)]
    - \mathrm{KL}(q \,\|\, p)\Big)

Each rank's minibatch likelihood is scaled by N / b (b: its own batch; unchanged code) and its KL
is the full one, so the average over ranks is exactly the ELBO of the global batch R·b; equivalently,
scaling by N / (R·b) and summing. ``--batch-size`` is per process: global batch = R × batch size.

How the gradients are reduced (one flat ``all_reduce`` per dtype, then divided by R):

- adapters (X, Y, Θ; LoRA factors; a point head): :class:`~bayes_polar.training.steps.AdapterStep` takes
  gradients with ``torch.autograd.grad``, which ``DistributedDataParallel``'s reducer never sees (it
  hooks gradient accumulation), and the features may come from a prefix cache that bypasses the
  module's ``forward``. So the step calls its ``grad_sync`` hook right after the gradients exist and
  before clipping, and :func:`replicate` sets it to :func:`average_gradients_`. The Euclidean
  gradients of the manifold parameters are averaged; the Riemannian gradient (a projection) and the
  landing field are linear in them, so averaging before the optimiser equals averaging after.
- guide (Pyro parameter store): ``SVI.step`` computes gradients and steps in one call. :func:`replicate`
  rebuilds the head's ``SVI`` with Pyro's ``loss_and_grads`` argument set to the ELBO's own
  ``loss_and_grads`` followed by :func:`average_gradients_` over the parameters it traced.
- joint mode: :class:`~bayes_polar.training.steps.JointStep` passes adapters and guide parameters to the hook.

Every rank then runs the same optimiser step on the same averaged gradients and parameters, so the
Stiefel factors stay bit-identical (and orthonormal) across ranks; :func:`check_in_sync` verifies it at
every checkpoint. All ranks seed alike and :func:`replicate` broadcasts rank 0's trainable tensors. The
torch RNG streams therefore agree across ranks: Monte Carlo ELBO particles over W are shared, as in one
process drawing them for the global batch (dropout masks, in ``lora-mcdropout``, are correlated too).

Rank 0 alone writes the run directory, checkpoints (others wait; each rank's RNG state goes into the
checkpoint) and artifacts, and evaluates; the other ranks return after training. Resuming needs the
same number of processes (the shards and the position in the epoch depend on it). Without an
initialised process group of more than one process, every function here is a no-op.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import checkpoint
from ..errors import BayesPolarError, ConfigError
from .rng import rng_state, set_rng_state

__all__ = ["DistributedContext", "ReplicaMismatchError", "average_gradients_", "broadcast_", "check_in_sync",
           "context", "init_distributed", "is_main", "mean_logs", "on_main", "replicate", "restore_rank_state",
           "save_checkpoint", "session", "shard"]


class ReplicaMismatchError(BayesPolarError, RuntimeError):
    """Parameters that should be identical on every process differ between ranks."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``world_size`` processes, this one is ``rank`` (``local_rank`` on its node)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True under a process group of more than one process (else: today's single-process path)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collectives run: ``cuda:LOCAL_RANK`` for NCCL, the CPU for gloo."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def context() -> DistributedContext:
    """The current context; world size 1 when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistributedContext(dist.get_world_size(), dist.get_rank(), local_rank, dist.get_backend())


def is_main() -> bool:
    return context().is_main


def shard() -> tuple[int, int]:
    """``(num_replicas, rank)`` for :func:`~bayes_polar.training.loop.epoch_loader`'s DistributedSampler."""
    ctx = context()
    return ctx.world_size, ctx.rank


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_*``).

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a group already exists. ``backend``:
    ``nccl`` when CUDA is available (each process on ``cuda:LOCAL_RANK``), else ``gloo``.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return context()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return context()


@contextlib.contextmanager
def session(backend: str | None = None):
    """``with session() as ctx:`` initialise from torchrun's environment, destroy the group at the end."""
    owned = not dist.is_initialized()
    ctx = init_distributed(backend)
    try:
        yield ctx
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------ collectives
def _flat_collective_(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective(buffer)`` on one flat buffer per dtype (on the backend's device), copy back in place."""
    device = context().device
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:  # insertion order: the same on every rank
        groups.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for members in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in members]).to(device)
            collective(flat)
            for t, chunk in zip(members, flat.split([t.numel() for t in members])):
                t.copy_(chunk.view_as(t))


def broadcast_(tensors, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (no-op in one process)."""
    if context().enabled:
        _flat_collective_(list(tensors), lambda flat: dist.broadcast(flat, src))


def average_gradients_(params) -> None:
    """Replace each ``p.grad`` by its mean over ranks, in place (before clipping and the optimiser step).

    A gradient that is None on some ranks counts as zero there (as in DDP); one that is None on every
    rank stays None. No-op in one process.
    """
    ctx = context()
    if not ctx.enabled:
        return
    params = list(params)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype)  # counts: exact
    _flat_collective_(grads + [present], dist.all_reduce)
    for p, grad, count in zip(params, grads, present.tolist()):
        p.grad = grad.div_(ctx.world_size) if count else None


def mean_logs(logs: dict) -> dict:
    """Numeric logs averaged over ranks (the global-batch ELBO, loss and gradient norm); as is in one process."""
    ctx = context()
    keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not ctx.enabled or not keys:
        return logs
    values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
    _flat_collective_([values], dist.all_reduce)
    return {**logs, **{k: v / ctx.world_size for k, v in zip(keys, values.tolist())}}


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only; every rank waits and returns its result (or raises its error).

    For file-system work: run directories, checkpoints. The result must be picklable.
    """
    ctx = context()
    if not ctx.enabled:
        return fn(*args, **kwargs)
    payload, failure = [None], None
    if ctx.is_main:
        try:
            payload = [("ok", fn(*args, **kwargs))]
        except Exception as exc:  # re-raised below, on every rank
            failure = exc
            payload = [("error", (type(exc).__name__, str(exc)))]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise failure if failure is not None else _remote_error(*value)
    return value


def _remote_error(name: str, message: str) -> Exception:
    """Rank 0's exception on another rank: the same library or builtin class when there is one."""
    from .. import errors
    import builtins

    cls = getattr(errors, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - an exotic constructor: fall back to a plain message
            pass
    return RuntimeError(f"rank 0: {name}: {message}")


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    ctx = context()
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _digest(named: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_in_sync(named: dict[str, torch.Tensor], what: str = "parameters") -> None:
    """Raise :class:`ReplicaMismatchError` unless ``named`` is bitwise identical on every rank."""
    digests = gather_objects(_digest(named))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ReplicaMismatchError(f"{what} of ranks {differ} differ from rank 0's: every process must start from the "
                                   "same backbone and seed and apply the same averaged updates")


# ------------------------------------------------------------------------------------ methods
def trainable_tensors(method) -> dict[str, torch.Tensor]:
    """Live tensors every rank must hold identically: adapter parameters and the head's parameters."""
    named = {f"model.{n}": p for n, p in method.model.named_parameters() if p.requires_grad}
    head = method.head
    if hasattr(head, "svi"):  # VariationalHead: the Pyro parameter store (unconstrained leaves)
        named.update({f"head.{n}": p for n, p in sorted(head.parameters().items())})
    else:
        named.update({f"head.{n}": p for n, p in head.named_parameters()})
    return named


def replicate(method) -> None:
    """Make ``method`` a replica: broadcast rank 0's trainable tensors, average gradients before every step.

    Checks that the frozen backbone is identical on every rank. No-op in one process.
    """
    if not context().enabled:
        return
    check_in_sync({n: p for n, p in method.model.named_parameters() if not p.requires_grad}, "frozen backbone weights")
    trainable = trainable_tensors(method)
    broadcast_(trainable.values())
    for step in [*method.steps, *method.warmup]:
        for s in (step, getattr(step, "adapter_step", None)):
            if s is not None and hasattr(s, "grad_sync"):
                s.grad_sync = average_gradients_
    if hasattr(method.head, "grad_sync"):
        method.head.grad_sync = average_gradients_


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(run_dir, tensors: dict, state: dict, *, step: int, **kwargs):
    """:func:`~bayes_polar.training.checkpoint.save_checkpoint` on rank 0, after checking the replicas agree.

    Adds ``world_size`` and every rank's RNG state (``rank_rng``) to ``state``; the others wait.
    In one process: exactly :func:`~bayes_polar.training.checkpoint.save_checkpoint`.
    """
    ctx = context()
    if not ctx.enabled:
        return checkpoint.save_checkpoint(run_dir, tensors, state, step=step, **kwargs)
    check_in_sync(tensors, f"checkpoint tensors at step {step}")
    state = dict(state, world_size=ctx.world_size, rank_rng=gather_objects(rng_state()))
    return on_main(checkpoint.save_checkpoint, run_dir, tensors, state, step=step, **kwargs)


def restore_rank_state(state: dict) -> None:
    """After :func:`~bayes_polar.training.loop.restore_training_state`: this rank's RNG; the world size must match."""
    ctx = context()
    saved = int(state.get("world_size", 1))
    if saved != ctx.world_size:
        raise ConfigError(f"the checkpoint was written by {saved} process(es) and this run has {ctx.world_size}: "
                          f"resume with torchrun --nproc_per_node {saved} (data shards, global batch and the "
                          "position in the epoch depend on it)")
    if ctx.enabled and "rank_rng" in state:
        set_rng_state(state["rank_rng"][ctx.rank])
