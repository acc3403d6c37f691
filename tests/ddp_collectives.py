"""The collectives of bayes_polar.training.distributed on 2 gloo processes; run by tests/test_distributed.py::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_collectives.py

Each rank asserts and prints ``rank R ok``; any failure exits non-zero.
"""
import torch

from bayes_polar.training import distributed as ddp
from bayes_polar.errors import ConfigError

torch.set_num_threads(1)


def expect_error(kind, fn, *args):
    try:
        fn(*args)
    except kind as exc:
        return exc
    raise AssertionError(f"expected {kind.__name__}")


def check(ctx) -> None:
    r = ctx.rank
    assert (ctx.world_size, ctx.backend, ctx.device.type, ctx.enabled) == (2, "gloo", "cpu", True)
    assert ddp.shard() == (2, r) and ddp.is_main() == (r == 0)

    # gradients: the mean over ranks; None on one rank counts as zero there; None on every rank stays None
    a = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.full((3,), float(r + 1))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b.grad = torch.full((2,), 4.0, dtype=torch.float64) if r == 0 else None
    c = torch.nn.Parameter(torch.zeros(1))
    ddp.average_gradients_([a, b, c])
    assert torch.equal(a.grad, torch.full((3,), 1.5)), a.grad
    assert torch.equal(b.grad, torch.full((2,), 2.0, dtype=torch.float64)), b.grad
    assert c.grad is None

    logs = ddp.mean_logs({"elbo": float(r), "grad_norm": 2.0 * r, "note": "x"})
    assert logs == {"elbo": 0.5, "grad_norm": 1.0, "note": "x"}, logs
    t = torch.full((2,), float(r + 7))
    ddp.broadcast_([t])
    assert torch.equal(t, torch.full((2,), 7.0))
    assert ddp.gather_objects(r) == [0, 1]

    # rank 0 works alone; every rank gets its result or its error
    assert ddp.on_main(lambda: f"from {r}") == "from 0"
    error = expect_error(ConfigError, ddp.on_main, _refuse)
    assert "refused on rank 0" in str(error)

    ddp.check_in_sync({"x": torch.ones(2)})
    expect_error(ddp.ReplicaMismatchError, ddp.check_in_sync, {"x": torch.full((2,), float(r))})


def _refuse():
    raise ConfigError("refused on rank 0")


if __name__ == "__main__":
    with ddp.session() as ctx:
        check(ctx)
        print(f"rank {ctx.rank} ok", flush=True)
