"""The paper-style results table: a grid of methods × tasks × seeds, in and out of distribution.

A grid file (JSON) names the cells and the settings they share::

    {"base": {"model": "smollm2-135m", "format": "options", "layers": "-2,-1", "steps": 150},
     "methods": ["lora-mle", "polar-vbll"], "tasks": ["arc_easy", "openbookqa"], "seeds": [0, 1],
     "ood": {"train": "openbookqa",
             "eval": ["arc_challenge", "arc_easy", "mmlu_college_chemistry", "mmlu_college_physics"]}}

Each cell is one ``bayes-polar fit`` run in ``OUT/cells/<task>/<method>/seed<k>``; finished cells
(with ``metrics.json``) are not re-run and interrupted ones resume from their checkpoints. The
frozen blocks' states are cached on disk once per task and shared by every cell. Results go to
``OUT/results.csv`` (one row per cell and evaluated split: calibration metrics, selective prediction,
OOD AUROC/AUPR per uncertainty score), ``OUT/table.md`` (ACC / ECE / NLL; AURC for every column; OOD
AUROC of max probability, entropy, mutual information and logit variance for the OOD training task's
columns; mean
± std over seeds) and ``OUT/reliability.png`` (one panel per method).
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.backbone import cache_dir
from ..training.checkpoint import atomic_write_text
from ..config import METHODS, FitConfig, read_json
from ..errors import ConfigError
from .uncertainty import SCORES

METRICS = ("acc", "ece", "nll", "brier")
EXTRA_METRICS = ("ace", "mce", "cw_ece")  # absent from runs made before they existed: empty cells
SELECTIVE = ("aurc", "e_aurc", "acc@80", "acc@90")
OOD_BLOCKS = (("max_prob", "max probability"), ("entropy", "predictive entropy"),
              ("mutual_information", "mutual information"), ("logit_variance", "logit variance"))


@dataclass
class Grid:
    base: dict
    methods: list[str]
    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    ood: dict | None = None

    @classmethod
    def load(cls, path) -> "Grid":
        values = read_json(path, "the grid file")
        unknown = set(values) - {"base", "methods", "tasks", "seeds", "ood"}
        if unknown:
            raise ConfigError(f"Unknown grid keys {sorted(unknown)} in {path}")
        grid = cls(**values)
        bad = [m for m in grid.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"Unknown methods {bad} in {path}; expected some of {METHODS}")
        FitConfig.from_dict(grid.base)  # fail early on a bad base configuration
        return grid

    def cells(self):
        """``(task, method, seed, FitConfig)`` for every cell, OOD evaluations on the OOD training task."""
        for task in self.tasks:
            targets = [task]
            if self.ood and task == self.ood["train"]:
                targets += [t for t in self.ood["eval"] if t != task]
            for method in self.methods:
                for seed in self.seeds:
                    config = FitConfig.from_dict({**self.base, "task": task, "method": method, "seed": seed,
                                                  "eval_tasks": ",".join(targets)})
                    yield task, method, seed, config


def cell_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "cells" / task / method / f"seed{seed}"


def run_grid(grid: Grid, out, progress: bool = True, log=print, jobs: int = 1) -> list[dict]:
    """Run every unfinished cell, then write results.csv, table.md and reliability.png.

    ``jobs > 1`` runs cells in that many processes (give each ``threads`` cores): the frozen-block
    caches are filled first, one task per process, so no two cells compute the same states.
    """
    out = Path(out)
    cells = list(grid.cells())
    todo = [(index, task, method, seed, _with_cache_dir(config))
            for index, (task, method, seed, config) in enumerate(cells, start=1)
            if not (cell_dir(out, task, method, seed) / "metrics.json").exists()]
    if jobs <= 1:
        for index, task, method, seed, config in todo:
            log(f"[{index}/{len(cells)}] {task} {method} seed {seed}")
            _run_cell(config, cell_dir(out, task, method, seed), progress, log)
    elif todo:
        _run_parallel(todo, len(cells), out, jobs, log)
    rows = collect_rows(grid, out)
    write_results(grid, rows, out)
    return rows


def _with_cache_dir(config: FitConfig) -> FitConfig:
    return config if config.cache_dir is not None else replace(config, cache_dir=str(cache_dir() / "prefix"))


def _run_parallel(todo: list, total: int, out: Path, jobs: int, log) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    views = {}  # per task, one pipeline per data view (temperature scaling holds out 10% of train)
    for _, task, method, _, config in todo:
        views.setdefault(task, {}).setdefault(method == "temperature-scaling", config)
    failures = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        log(f"filling the frozen-block caches of {len(views)} tasks in {jobs} processes")
        for future in as_completed([pool.submit(_warm_caches, list(v.values())) for v in views.values()]):
            future.result()
        futures = {pool.submit(_run_cell, config, str(cell_dir(out, task, method, seed))):
                   f"[{index}/{total}] {task} {method} seed {seed}" for index, task, method, seed, config in todo}
        for future in as_completed(futures):
            try:
                future.result()
                log(f"{futures[future]}: done")
            except Exception as exc:  # keep the other cells running; report them all at the end
                failures.append(f"{futures[future]}: {type(exc).__name__}: {exc}")
                log(f"{futures[future]}: FAILED ({type(exc).__name__}: {exc})")
    if failures:
        raise ConfigError(f"{len(failures)} cell(s) failed (rerun the same command to retry them): "
                          + "; ".join(failures))


def _warm_caches(configs: list[FitConfig]) -> None:
    """Fill the on-disk prefix caches of one task's cells (training split, held-out slice, evaluated splits),
    one configuration after the other, so that a split is computed once."""
    from ..run import build_pipeline, encode_eval, eval_targets, warm_cache

    for config in configs:
        pipe = build_pipeline(config)
        for encoded in (pipe.train, pipe.heldout):
            if encoded is not None:
                warm_cache(pipe, encoded)
        for task, split in eval_targets(config.eval_tasks, config.task):
            warm_cache(pipe, encode_eval(pipe, task, split))


def _run_cell(config: FitConfig, directory, progress: bool = False, log=lambda *_: None) -> None:
    """One cell: ``run_fit`` into ``directory``, resuming an interrupted one."""
    from ..run import run_fit

    run_fit(config, directory, resume=Path(directory).exists(), progress=progress, log=log)


def collect_rows(grid: Grid, out: Path) -> list[dict]:
    rows = []
    for task, method, seed, _ in grid.cells():
        metrics_path = cell_dir(out, task, method, seed) / "metrics.json"
        if not metrics_path.exists():
            continue
        metrics = json.loads(metrics_path.read_text())
        for name, result in metrics["evaluations"].items():
            eval_task, split = name.split("/")
            selective, ood = result.get("selective", {}), result.get("ood", {})
            rows.append({"method": method, "train_task": task, "eval_task": eval_task, "split": split,
                         "kind": "id" if eval_task == task else "ood", "seed": seed,
                         **{k: result[k] for k in METRICS}, **{k: result.get(k) for k in EXTRA_METRICS},
                         **{k: selective.get(k) for k in SELECTIVE},
                         **{f"{m}_{score}": ood.get(m, {}).get(score) for m in ("auroc", "aupr") for score in SCORES},
                         "n": result["n"], "train_seconds": metrics["train"]["seconds"]})
    return rows


def _columns(grid: Grid) -> list[tuple[str, str, str]]:
    """(label, train task, eval task) per table column: ID tasks, then OOD columns."""
    columns = [(task, task, task) for task in grid.tasks]
    if grid.ood:
        columns += [(f"{grid.ood['train']}→{t}", grid.ood["train"], t) for t in grid.ood["eval"]
                    if t != grid.ood["train"]]
    return columns


def markdown_table(grid: Grid, rows: list[dict], header: str = "") -> str:
    """Blocks in the paper's layout (methods × datasets, mean ± std over seeds): ACC / ECE / NLL and
    AURC for every column; OOD AUROC per score for the OOD training task's OOD columns."""
    lines = [header] if header else []
    columns = _columns(grid)
    blocks = [("acc", 100, "ACC (%) ↑", columns), ("ece", 1, "ECE (%) ↓", columns), ("nll", 1, "NLL ↓", columns),
              ("aurc", 100, "AURC (%, selective risk by max probability) ↓", columns)]
    ood_columns = [c for c in columns if grid.ood and c[1] == grid.ood["train"] and c[2] != c[1]]
    blocks += [(f"auroc_{score}", 100, f"OOD AUROC (%) of {label}, {grid.ood['train']} as ID ↑", ood_columns)
               for score, label in OOD_BLOCKS if ood_columns]
    for metric, scale, label, block_columns in blocks:
        lines += ["", f"**{label}**", "", "| method | " + " | ".join(c[0] for c in block_columns) + " |",
                  "|---|" + "---|" * len(block_columns)]
        for method in grid.methods:
            cells = []
            for _, train_task, eval_task in block_columns:
                values = [r[metric] * scale for r in rows if r["method"] == method and r["train_task"] == train_task
                          and r["eval_task"] == eval_task and r.get(metric) is not None]
                cells.append(_mean_std(values))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_results(grid: Grid, rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(out / "results.csv.tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "results.csv.tmp").replace(out / "results.csv")
    base = FitConfig.from_dict(grid.base)
    header = (f"{base.model}, `{base.format}` format, adapters on blocks {base.layers} "
              f"({base.target_modules}, rank {base.rank}), {base.steps} steps of {base.batch_size} questions, "
              f"train_limit {base.train_limit}, eval_limit {base.eval_limit}, seeds {grid.seeds}; mean ± std over seeds.")
    atomic_write_text(out / "table.md", markdown_table(grid, rows, header))
    _reliability_figure(grid, out)


def _reliability_figure(grid: Grid, out: Path) -> None:
    """One reliability panel per method, on the first task and seed (from the saved predictions)."""
    from safetensors.torch import load_file

    from .metrics import plot_reliability_diagrams

    task, seed = grid.tasks[0], grid.seeds[0]
    curves = {}
    for method in grid.methods:
        path = cell_dir(out, task, method, seed) / "predictions.safetensors"
        if path.exists():
            saved = load_file(path)
            key = next(k[: -len("/probs")] for k in saved if k.startswith(f"{task}/") and k.endswith("/probs"))
            curves[method] = (saved[f"{key}/probs"], saved[f"{key}/labels"])
    if curves:
        plot_reliability_diagrams(curves, out / "reliability.png", title=f"{task} (seed {seed})")
