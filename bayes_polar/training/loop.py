"""The one training loop, and the checkpoint state that makes it resumable to the same result.

.. code-block:: text

    for step in range(start, steps):        # minibatch steps over seeded, per-epoch permutations
        logs = method.train_step(batch, step)
        if callback(step + 1, logs): break  # logging, checkpoints, early stop

Resuming restores adapters, head, both optimisers and schedules, every RNG and the position in
the epoch, so a resumed run reproduces an uninterrupted one (same seed, same device).
"""
from __future__ import annotations

import torch
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import rng_state, set_rng_state
from ..data.formats import make_loader


def epoch_loader(encoded, tokenizer, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
    """A loader over seeded per-epoch permutations (``loader.sampler.set_epoch(e)``), sharded for DDP."""
    sampler = DistributedSampler(encoded, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                 drop_last=num_replicas > 1)
    return make_loader(encoded, tokenizer, batch_size=batch_size, sampler=sampler)


def warm_prefix_cache(method, encoded, tokenizer, batch_size: int, progress: bool = False) -> int:
    """Fill a prefix cache (if the method has one) over ``encoded``, in the cache's fixed fill order."""
    trunk = method.extractor.trunk
    if not hasattr(trunk, "warm_task"):
        return 0
    return trunk.warm_task(encoded, tokenizer, batch_size, progress)


def fit(method, loader, total_steps: int, start_step: int = 0, callback=None) -> int:
    """Train ``method`` for ``total_steps`` minibatch steps from ``start_step``; returns the last step.

    ``callback(step, logs)`` runs after every step; returning True stops training.
    """
    steps_per_epoch = len(loader)
    step = start_step
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        loader.sampler.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index < offset:
                continue  # resuming mid-epoch: the permutation is the same, skip what was done
            logs = method.train_step(batch, step)
            step += 1
            if (callback is not None and callback(step, logs)) or step >= total_steps:
                method.model.eval()
                return step
    method.model.eval()
    return step


def _encode_keys(obj):
    """Optimiser state dicts key parameters by int; JSON wants str keys ("int:3")."""
    if isinstance(obj, dict):
        return {(f"int:{k}" if isinstance(k, int) else k): _encode_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_keys(v) for v in obj]
    return obj


def _decode_keys(obj):
    if isinstance(obj, dict):
        return {(int(k[4:]) if isinstance(k, str) and k.startswith("int:") else k): _decode_keys(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_keys(v) for v in obj]
    return obj


def training_state(method, step: int, trace: list[float]) -> tuple[dict, dict]:
    """``(tensors, state)`` for :func:`~bayes_polar.training.checkpoint.save_checkpoint`."""
    state = {"step": step, "trace": list(trace), "rng": rng_state(),
             "optimizers": _encode_keys(method.optimizer_state())}
    return method.state_tensors(), state


def restore_training_state(method, tensors: dict, state: dict) -> tuple[int, list[float]]:
    """Inverse of :func:`training_state`; returns ``(step, trace)``."""
    method.load_state_tensors(tensors)
    method.load_optimizer_state(_decode_keys(state["optimizers"]))
    set_rng_state(state["rng"])
    return int(state["step"]), [float(x) for x in state["trace"]]


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
