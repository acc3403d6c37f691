"""The results-table grid on the tiny random Llama: cells, resumability, CSV, Markdown, figure."""
import csv
import json
import shutil

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
    novelty = table.split("OOD AUROC (%) of novelty")[1].split("**")[1]  # Gaussian heads only
    assert "| lora-mle | – | – |" in novelty and "| polar-vbll | – |" not in novelty
    auroc = table.split("OOD AUROC (%) of max probability")[1].split("**")[1]
    assert auroc.strip().splitlines()[0] == "| method | openbookqa→arc_challenge | openbookqa→mmlu_college_physics |"
    assert all((tmp_path / "out" / f"reliability_{task}.png").stat().st_size > 0 for task in ("openbookqa", "arc_easy"))
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
    assert names == {"arc_easy-train-options-48-8.safetensors", "arc_easy-validation-options-48-4.safetensors"}, \
        "temperature scaling's slices (train-fit, train-heldout) read their states from train's file"


TINY_BASE = {"model": "tiny-random-llama", "train_limit": 10, "eval_limit": 6, "steps": 2, "batch_size": 4,
             "layers": "-1", "rank": 2, "threads": 1, "checkpoint_every": 0, "max_length": 48,
             "predictive_samples": 8}


def test_settings_are_chosen_on_a_dev_split_cut_from_train_then_fixed_for_every_task(tmp_path, data_dir):
    """The protocol: each method's candidates fit on train-fit of the selection task and are scored on
    train-heldout (never on a reported split); the lowest dev NLL is used in every task's cells."""
    grid = Grid(base={**TINY_BASE, "data_dir": str(data_dir), "cache_dir": str(tmp_path / "cache")},
                methods=["lora-mle", "lora-ensemble", "temperature-scaling"], tasks=["arc_easy", "openbookqa"],
                search={"lora-mle": [{"lr": 1e-4}, {"lr": 0.3, "head_lr": 0.5}], "lora-ensemble": "lora-mle",
                        "temperature-scaling": [{"head_lr": 0.05}]},
                task_overrides={"openbookqa": {"train_limit": 8}}, select_on="arc_easy")
    grid.base["ensemble_size"] = 2
    grid.check()
    out = tmp_path / "out"
    rows = run_grid(grid, out, progress=False, log=lambda *_: None)

    candidates = [json.loads((out / "select" / "lora-mle" / f"setting{i}" / "config.json").read_text())
                  for i in (0, 1)]
    assert {(c["train_split"], c["eval_tasks"], c["seed"]) for c in candidates} == {("train-fit", "arc_easy:train-heldout", 0)}
    assert not (out / "select" / "temperature-scaling").exists(), "one setting: nothing to choose"
    with open(out / "selection.csv") as f:
        scored = list(csv.DictReader(f))
    assert [r["setting"] for r in scored] == ["0", "1"]
    best = min(scored, key=lambda r: float(r["dev_nll"]))
    assert [r["chosen"] for r in scored] == [str(r is best) for r in scored]
    chosen = grid.search["lora-mle"][int(best["setting"])]
    assert json.loads((out / "selected.json").read_text()) == {"lora-mle": chosen}
    for method in ("lora-mle", "lora-ensemble"):  # the ensemble takes its members' method's choice
        for task in ("arc_easy", "openbookqa"):
            config = json.loads((out / "cells" / task / method / "seed0" / "config.json").read_text())
            assert config["lr"] == chosen["lr"] and config["train_split"] == "train"
    obqa = json.loads((out / "cells" / "openbookqa" / "temperature-scaling" / "seed0" / "config.json").read_text())
    assert (obqa["train_limit"], obqa["head_lr"]) == (8, 0.05)
    assert {r["split"] for r in rows} == {"validation"}
    assert "chosen by dev NLL on arc_easy:train-heldout" in (out / "table.md").read_text()

    shutil.rmtree(out / "cells" / "openbookqa" / "lora-ensemble")  # a grid still running: report what is done
    partial = run_grid(grid, out, progress=False, log=lambda *_: None, report_only=True)
    assert len(partial) == len(rows) - 1 and not (out / "cells" / "openbookqa" / "lora-ensemble").exists()

    grid.search["lora-mle"] = [{"lr": 1e-4}, {"lr": 2e-4}]  # another grid over the same folder
    (out / "selected.json").unlink()
    with pytest.raises(ConfigError, match="was run with other settings"):
        run_grid(grid, out, progress=False, log=lambda *_: None)
    (out / "select" / "lora-mle" / "setting1" / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="the selection in .* is unfinished \\(lora-mle setting 1\\)"):
        run_grid(grid, out, progress=False, log=lambda *_: None, report_only=True)


def test_select_seeds_ranks_each_setting_by_its_mean_dev_nll_over_the_first_seeds(tmp_path, data_dir):
    grid = Grid(base={**TINY_BASE, "data_dir": str(data_dir), "cache_dir": str(tmp_path / "cache")},
                methods=["lora-mle"], tasks=["arc_easy"], seeds=[3, 5, 7], select_seeds=2,
                search={"lora-mle": [{"lr": 1e-4}, {"lr": 0.3, "head_lr": 0.5}]})
    grid.check()
    out = tmp_path / "out"
    run_grid(grid, out, progress=False, log=lambda *_: None, select_only=True)
    folders = sorted(p.name for p in (out / "select" / "lora-mle").iterdir())
    assert folders == ["setting0", "setting0-seed5", "setting1", "setting1-seed5"]  # seed 7 is not a selection seed
    key = "arc_easy/train-heldout"
    with open(out / "selection.csv") as f:
        scored = list(csv.DictReader(f))
    for row in scored:
        runs = [out / "select" / "lora-mle" / name for name in folders if name.startswith(f"setting{row['setting']}")]
        assert sorted(json.loads((run / "config.json").read_text())["seed"] for run in runs) == [3, 5]
        nlls = [json.loads((run / "metrics.json").read_text())["evaluations"][key]["nll"] for run in runs]
        assert nlls[0] != nlls[1], "the seeds differ, so the mean is not either one"
        assert float(row["dev_nll"]) == pytest.approx(sum(nlls) / 2) and row["seeds"] == "2"
    best = min(scored, key=lambda r: float(r["dev_nll"]))
    assert json.loads((out / "selected.json").read_text()) == {"lora-mle": grid.search["lora-mle"][int(best["setting"])]}
    grid.select_seeds = 4
    with pytest.raises(ConfigError, match="select_seeds must be a whole number from 1 to the grid's 3 seeds"):
        grid.check()


def test_train_fit_reads_the_cached_states_of_train(tmp_path, data_dir):
    """train-fit is a slice of train: with train's prefix cache on disk, no state is computed again."""
    from bayes_polar.config import FitConfig
    from bayes_polar.run import build_pipeline, warm_cache

    base = {**TINY_BASE, "train_limit": None, "task": "winogrande_xs", "data_dir": str(data_dir),
            "cache_dir": str(tmp_path / "cache"), "method": "polar-mle"}
    warm_cache(build_pipeline(FitConfig(**base)), build_pipeline(FitConfig(**base)).train)
    saved = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert saved == ["winogrande_xs-train-options-48-160.safetensors"]
    pipe = build_pipeline(FitConfig(**base, train_split="train-fit"))
    trunk = pipe.method.extractor.trunk
    assert len(pipe.train) == 144 and len(trunk.store) >= 2 * 144, "every option's states came from train's file"
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == saved, "nothing new to write"
    scaling = build_pipeline(FitConfig(**{**base, "method": "temperature-scaling"}, train_split="train-fit"))
    assert scaling.heldout.task.split == "train-fit-heldout"
    warm_cache(scaling, scaling.heldout)  # a slice of a slice: still read from train's file
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == saved


def test_each_cache_file_holds_its_own_split_only(tmp_path, data_dir):
    """A pipeline warms train, then validation: validation's file does not carry train's states too."""
    from safetensors import safe_open

    from bayes_polar.config import FitConfig
    from bayes_polar.run import build_pipeline, encode_eval, warm_cache

    pipe = build_pipeline(FitConfig(**{**TINY_BASE, "train_limit": 12, "task": "arc_easy", "data_dir": str(data_dir),
                                       "cache_dir": str(tmp_path / "cache"), "method": "polar-mle"}))
    validation = encode_eval(pipe, "arc_easy", "validation")
    warm_cache(pipe, pipe.train)
    warm_cache(pipe, validation)

    def stored(split, n):
        path = next((tmp_path / "cache").rglob(f"arc_easy-{split}-options-48-{n}.safetensors"))
        with safe_open(path, "pt") as f:
            return len(f.keys())

    assert stored("train", 12) == sum(len(item.sequences) for item in pipe.train.items)
    assert stored("validation", 6) == sum(len(item.sequences) for item in validation.items)


def test_a_slice_of_a_slice_reads_the_cache_of_the_slice_it_is_cut_from(tmp_path, data_dir):
    """Selection cells warm train-fit first (no train file exists): temperature scaling's train-fit-heldout
    then reads train-fit's file."""
    from bayes_polar.config import FitConfig
    from bayes_polar.run import build_pipeline, warm_cache

    base = {**TINY_BASE, "train_limit": None, "task": "winogrande_xs", "data_dir": str(data_dir),
            "cache_dir": str(tmp_path / "cache"), "train_split": "train-fit"}
    fitted = build_pipeline(FitConfig(**base, method="polar-mle"))
    warm_cache(fitted, fitted.train)
    saved = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert saved == ["winogrande_xs-train-fit-options-48-144.safetensors"]
    scaling = build_pipeline(FitConfig(**base, method="temperature-scaling"))
    warm_cache(scaling, scaling.heldout)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == saved


@pytest.mark.parametrize("search,match", [
    ({"lora-mle": [{"lr": 1e-3}] * 5}, "1 to 4 settings"),
    ({"lora-mle": [{"seed": 3}, {"lr": 1e-3}]}, r"sets \['seed'\], which the grid sets per cell"),
    ({"lora-mle": [{"lr": -1.0}, {"lr": 1e-3}]}, "Expected lr > 0"),
    ({"polar-mle": [{"lr": 1e-3}, {"lr": 1e-2}]}, "not one of the grid's methods"),
    ({"lora-mle": "lora-map"}, "which has no list of candidate settings"),
])
def test_bad_searches_fail_before_any_cell(tmp_path, search, match):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"base": {}, "methods": ["lora-mle", "lora-map"], "tasks": ["arc_easy"],
                                "search": search}))
    with pytest.raises(ConfigError, match=match):
        Grid.load(path)


def test_cells_run_seed_by_seed():
    """A grid stopped part way (a session ends) has whole seeds of every column, not every seed of a few."""
    grid = Grid(base=dict(TINY_BASE), methods=["lora-mle", "polar-vbll"], tasks=["arc_easy", "openbookqa"],
                seeds=[0, 1, 2])
    seeds = [seed for _, _, seed, _ in grid.cells()]
    assert seeds == [0] * 4 + [1] * 4 + [2] * 4
