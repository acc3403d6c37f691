"""Run ``bayes-polar fit`` as one torchrun process, then save this rank's trained tensors.

Usage (what tests/integration/test_distributed.py does)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py DUMP_DIR fit --out ...

The spy on ``train_pipeline`` only keeps a reference to the pipeline that ``run_fit`` trains; the
run itself is the CLI's. ``DUMP_DIR/rank<r>.safetensors`` holds ``Method.state_tensors()`` of rank r.
"""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

import bayes_polar.run as run  # noqa: E402
from bayes_polar.cli import main  # noqa: E402


def spy_main(dump_dir: Path, argv: list[str]) -> int:
    trained = []
    train_pipeline = run.train_pipeline

    def spy(pipe, *args, **kwargs):
        trained.append(pipe)
        return train_pipeline(pipe, *args, **kwargs)

    run.train_pipeline = spy
    code = main(argv)
    if code == 0:
        tensors = {k: v.contiguous() for k, v in trained[0].method.state_tensors().items()}
        dump_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, dump_dir / f"rank{os.environ['RANK']}.safetensors")
    return code


if __name__ == "__main__":
    sys.exit(spy_main(Path(sys.argv[1]), sys.argv[2:]))
