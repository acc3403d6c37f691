"""The results-table grid on the tiny random Llama: cells, resumability, CSV, Markdown, figure."""
import csv
import json

import pytest

from bayes_polar.errors import ConfigError
from bayes_polar.evaluation.table import Grid, run_grid

pytestmark = pytest.mark.integration


def test_grid_writes_the_table_and_skips_finished_cells(tmp_path, data_dir):
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps({
        "base": {"model": "tiny-random-llama", "data_dir": str(data_dir), "train_limit": 12, "eval_limit": 6,
                 "steps": 2, "batch_size": 4, "layers": "-1", "rank": 2, "threads": 1, "checkpoint_every": 0,
                 "max_length": 64, "predictive_samples": 16, "cache_dir": str(tmp_path / "cache")},
        "methods": ["lora-mle", "polar-vbll"], "tasks": ["openbookqa", "arc_easy"], "seeds": [0, 1],
        "ood": {"train": "openbookqa", "eval": ["arc_challenge", "mmlu_college_physics"]}}))
    grid = Grid.load(grid_file)
    rows = run_grid(grid, tmp_path / "out", progress=False, log=lambda *_: None)
    assert len(rows) == 2 * 2 * (3 + 1)  # methods × seeds × (OBQA: ID + 2 OOD, ARC-E: ID)
    with open(tmp_path / "out" / "results.csv") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == len(rows)
    ood = [r for r in saved if r["kind"] == "ood"]
    assert ood and all(0 <= float(r["auroc_mutual_information"]) <= 1 for r in ood)
    assert all(r["auroc_max_prob"] == "" for r in saved if r["kind"] == "id")  # the ID split is the reference
    assert all(0 <= float(r["aurc"]) <= 1 and r["ace"] != "" for r in saved)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "openbookqa→mmlu_college_physics" in table and "| polar-vbll |" in table and "±" in table
    blocks = table.split("**")[1::2]
    assert "AURC (%, selective risk by max probability) ↓" in blocks
    assert "OOD AUROC (%) of mutual information, openbookqa as ID ↑" in blocks
    auroc = table.split("OOD AUROC (%) of max probability")[1].split("**")[1]
    assert auroc.strip().splitlines()[0] == "| method | openbookqa→arc_challenge | openbookqa→mmlu_college_physics |"
    assert (tmp_path / "out" / "reliability.png").stat().st_size > 0
    assert any((tmp_path / "cache").rglob("*.safetensors")), "frozen-block states cached on disk"

    marker = tmp_path / "out" / "cells" / "arc_easy" / "lora-mle" / "seed0" / "metrics.json"
    before = marker.stat().st_mtime_ns
    run_grid(grid, tmp_path / "out", progress=False, log=lambda *_: None)
    assert marker.stat().st_mtime_ns == before, "finished cells are not re-run"


def test_bad_grid_files(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"base": {}, "methods": ["bayes-by-backprop"], "tasks": ["arc_easy"]}))
    with pytest.raises(ConfigError, match="Unknown methods"):
        Grid.load(path)
    path.write_text(json.dumps({"base": {"stepz": 3}, "methods": ["lora-mle"], "tasks": ["arc_easy"]}))
    with pytest.raises(ConfigError, match="Unknown configuration keys"):
        Grid.load(path)


def test_grid_in_two_processes_matches_one(tmp_path, data_dir):
    """--jobs 2: caches filled first, cells in spawned processes; same metrics as the sequential grid."""
    base = {"model": "tiny-random-llama", "data_dir": str(data_dir), "train_limit": 8, "eval_limit": 4,
            "steps": 2, "batch_size": 4, "layers": "-1", "rank": 2, "threads": 1, "checkpoint_every": 0,
            "max_length": 48, "predictive_samples": 8}
    grid = Grid(base={**base, "cache_dir": str(tmp_path / "cache")}, methods=["polar-vbll", "temperature-scaling"],
                tasks=["arc_easy"], seeds=[0])
    parallel = run_grid(grid, tmp_path / "parallel", progress=False, log=lambda *_: None, jobs=2)
    sequential = run_grid(Grid(base={**base, "cache_dir": str(tmp_path / "cache2")}, methods=grid.methods,
                               tasks=grid.tasks, seeds=grid.seeds), tmp_path / "seq", progress=False,
                          log=lambda *_: None)
    key = lambda r: (r["method"], r["eval_task"])  # noqa: E731
    assert len(parallel) == 2
    for a, b in zip(sorted(parallel, key=key), sorted(sequential, key=key)):
        assert a["acc"] == b["acc"] and a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    names = {p.name for p in (tmp_path / "cache").rglob("*.safetensors")}
    assert any("train-heldout" in n for n in names), "temperature scaling's held-out slice was cached too"
