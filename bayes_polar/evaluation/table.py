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
± std over seeds) and ``OUT/reliability_<task>.png`` (one panel per method).

**Choosing hyperparameters** (the tuning protocol). ``"search"`` gives each method at most
``MAX_SETTINGS`` candidate settings (or names another method whose choice it takes, e.g. the ensemble
takes its members' method's); ``"task_overrides"`` sets per-task keys (OpenBookQA's ``train_limit``)::

    "search": {"lora-mle": [{"lr": 1e-3}, {"lr": 3e-3}], "lora-ensemble": "lora-mle"},
    "select_on": "arc_easy", "task_overrides": {"openbookqa": {"train_limit": 2000}}

Before any table cell, every candidate is fitted on ``select_on``'s ``train-fit`` split (seed
``seeds[0]``) in ``OUT/select/<method>/setting<i>`` and scored on ``train-heldout`` (the last 10 % of
the training split, the slice temperature scaling holds out): the one with the lowest dev NLL is
used for that method in every task and seed. ``"select_seeds": n`` (default 1) fits each candidate
with the first n seeds instead (``setting<i>-seed<s>`` for the later ones) and ranks the mean dev NLL,
a choice less at the mercy of one seed's noise. The reported splits are never used for a choice. The
choice goes to ``OUT/selection.csv`` / ``OUT/selected.json`` and into ``table.md``.
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
POINT_METRICS = ("acc", "ece", "nll")  # of the point prediction (posterior mean), for the Bayesian methods
SELECTIVE = ("aurc", "e_aurc", "acc@80", "acc@90")
OOD_BLOCKS = (("max_prob", "max probability"), ("entropy", "predictive entropy"),
              ("mutual_information", "mutual information"), ("logit_variance", "logit variance"),
              ("novelty", "novelty (logit variance per unit spread of the options)"))


MAX_SETTINGS = 4  # candidate settings per method in "search": the protocol's equal, small budget
SELECTION_SPLIT = "train-heldout"  # the dev split settings are chosen on (cut from the training split)
CELL_KEYS = ("task", "method", "seed", "eval_tasks", "train_split")  # set by the grid, never by a setting


@dataclass
class Grid:
    base: dict
    methods: list[str]
    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    ood: dict | None = None
    task_overrides: dict[str, dict] = field(default_factory=dict)
    search: dict[str, list[dict] | str] = field(default_factory=dict)
    select_on: str | None = None  # the task settings are chosen on (default: the first task)
    select_seeds: int = 1  # the first n of ``seeds`` each candidate is fitted with (its dev NLL is their mean)
    selected: dict[str, dict] = field(default_factory=dict)  # method -> chosen setting (filled by run_grid)

    @classmethod
    def load(cls, path) -> "Grid":
        values = read_json(path, "the grid file")
        keys = {"base", "methods", "tasks", "seeds", "ood", "task_overrides", "search", "select_on", "select_seeds"}
        unknown = set(values) - keys
        if unknown:
            raise ConfigError(f"Unknown grid keys {sorted(unknown)} in {path}; known keys: {sorted(keys)}")
        grid = cls(**values)
        try:
            grid.check()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return grid

    def check(self) -> None:
        """Every method known, every setting at most ``MAX_SETTINGS`` valid configurations, before any cell runs."""
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"Unknown methods {bad}; expected some of {METHODS}")
        FitConfig.from_dict(self.base)  # fail early on a bad base configuration
        if not (isinstance(self.select_seeds, int) and 1 <= self.select_seeds <= len(self.seeds)):
            raise ConfigError(f"select_seeds must be a whole number from 1 to the grid's {len(self.seeds)} seeds, "
                              f"got {self.select_seeds!r}")
        for task, values in self.task_overrides.items():
            _check_setting(values, f"task_overrides[{task!r}]")
            FitConfig.from_dict({**self.base, **values, "task": task})
        for method, candidates in self.search.items():
            if method not in self.methods:
                raise ConfigError(f"search names {method!r}, which is not one of the grid's methods {self.methods}")
            if isinstance(candidates, str):
                if not isinstance(self.search.get(candidates), list):
                    raise ConfigError(f"search[{method!r}] takes the choice of {candidates!r}, which has no list of "
                                      "candidate settings in search")
                continue
            if not isinstance(candidates, list) or not 1 <= len(candidates) <= MAX_SETTINGS:
                raise ConfigError(f"search[{method!r}] must be a list of 1 to {MAX_SETTINGS} settings (dicts) or the "
                                  f"name of another method, got {candidates!r}")
            for index, setting in enumerate(candidates):
                _check_setting(setting, f"search[{method!r}][{index}]")
                FitConfig.from_dict({**self.base, **setting, "method": method})

    @property
    def selection_task(self) -> str:
        return self.select_on or self.tasks[0]

    def candidates(self):
        """A :class:`Candidate` for every setting to choose between and every seed it is fitted with."""
        task = self.selection_task
        for method in self.methods:
            settings = self.search.get(method)
            if not isinstance(settings, list) or len(settings) < 2:
                continue  # nothing to choose (no search, one setting, or another method's choice)
            for index, setting in enumerate(settings):
                for seed in self.seeds[:self.select_seeds]:
                    config = self._config(task, method, seed, setting, train_split="train-fit",
                                          eval_tasks=f"{task}:{SELECTION_SPLIT}")
                    yield Candidate(method, index, seed, setting, config, seed != self.seeds[0])

    def setting(self, method: str) -> dict:
        """The setting ``method`` runs with in the table: the chosen one, the only one, or none (``base``)."""
        settings = self.search.get(method)
        if isinstance(settings, str):
            return self.setting(settings)
        if method in self.selected:
            return self.selected[method]
        if isinstance(settings, list) and len(settings) == 1:
            return settings[0]
        if isinstance(settings, list):
            raise ConfigError(f"{method}: {len(settings)} candidate settings and none chosen yet (run the selection)")
        return {}

    def cells(self):
        """``(task, method, seed, FitConfig)`` for every cell, OOD evaluations on the OOD training task;
        seed by seed, so that a grid stopped part way has whole seeds of every column."""
        for seed in self.seeds:
            for task in self.tasks:
                targets = [task]
                if self.ood and task == self.ood["train"]:
                    targets += [t for t in self.ood["eval"] if t != task]
                for method in self.methods:
                    yield task, method, seed, self._config(task, method, seed, self.setting(method),
                                                           eval_tasks=",".join(targets))

    def _config(self, task: str, method: str, seed: int, setting: dict, **cell) -> FitConfig:
        return FitConfig.from_dict({**self.base, **self.task_overrides.get(task, {}), **setting, "task": task,
                                    "method": method, "seed": seed, **cell})


@dataclass(frozen=True)
class Candidate:
    """One candidate setting of one method, fitted with one seed on the selection task's ``train-fit``."""

    method: str
    index: int  # in ``search[method]``
    seed: int
    setting: dict
    config: FitConfig
    later_seed: bool  # not the grid's first seed (its folder names the seed)

    @property
    def label(self) -> str:
        return f"{self.method} setting {self.index}" + (f" seed {self.seed}" if self.later_seed else "")

    def directory(self, out: Path) -> Path:
        name = f"setting{self.index}" + (f"-seed{self.seed}" if self.later_seed else "")
        return Path(out) / "select" / self.method / name


def _check_setting(values, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a dict of configuration keys, got {values!r}")
    fixed = sorted(set(values) & set(CELL_KEYS))
    if fixed:
        raise ConfigError(f"{where} sets {fixed}, which the grid sets per cell")


def cell_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "cells" / task / method / f"seed{seed}"


def run_grid(grid: Grid, out, progress: bool = True, log=print, jobs: int = 1, select_only: bool = False,
             report_only: bool = False) -> list[dict]:
    """Choose each method's setting (when the grid has a search), run every unfinished cell, then write
    results.csv, table.md and reliability_<task>.png.

    ``jobs > 1`` runs cells in that many processes (give each ``threads`` cores): the frozen-block
    caches are filled first, one task per process, so no two cells compute the same states.
    ``select_only``: stop after the selection (``selection.csv``, ``selected.json``).
    ``report_only``: run nothing; write the table of the cells finished so far (the selection must be).
    """
    out = Path(out)
    candidates = list(grid.candidates())
    if select_only and not candidates:
        raise ConfigError("select_only: the grid's search gives no method two or more settings to choose between")
    if candidates:
        if report_only:
            missing = [c.label for c in candidates if not (c.directory(out) / "metrics.json").exists()]
            if missing:
                raise ConfigError(f"report_only: the selection in {out} is unfinished ({', '.join(missing)})")
        else:
            _run_cells([(f"select {c.label}", c.config, c.directory(out)) for c in candidates], out, jobs, progress,
                       log)
        grid.selected = select_settings(grid, out)
        if select_only:
            return []
    cells = list(grid.cells())
    if not report_only:
        _run_cells([(f"[{index}/{len(cells)}] {task} {method} seed {seed}", config,
                     cell_dir(out, task, method, seed))
                    for index, (task, method, seed, config) in enumerate(cells, start=1)], out, jobs, progress, log)
    rows = collect_rows(grid, out)
    write_results(grid, rows, out)
    return rows


def _run_cells(cells: list[tuple[str, FitConfig, Path]], out: Path, jobs: int, progress: bool, log) -> None:
    """Run the cells without ``metrics.json``; a finished cell made with another configuration is an error."""
    todo = []
    for label, config, directory in cells:
        config = _with_cache_dir(config)
        if (directory / "metrics.json").exists():
            _check_finished(directory, config)
        else:
            todo.append((label, config, directory))
    if jobs <= 1:
        for label, config, directory in todo:
            log(label)
            _run_cell(config, directory, progress, log)
    elif todo:
        _run_parallel(todo, jobs, log)


def _check_finished(directory: Path, config: FitConfig) -> None:
    saved = read_json(directory / "config.json", "a finished cell's configuration")
    wanted = config.to_dict()
    changed = sorted(k for k in wanted if k != "cache_dir" and k in saved and saved[k] != wanted[k])
    if changed:
        raise ConfigError(f"{directory} was run with other settings ({', '.join(f'{k}: {saved[k]!r} -> {wanted[k]!r}' for k in changed)}); "
                          "move it away to rerun it with the grid's settings, or restore the grid that made it")


def select_settings(grid: Grid, out: Path) -> dict[str, dict]:
    """Each searched method's setting with the lowest dev NLL (mean over its ``select_seeds`` seeds);
    writes ``selection.csv`` and ``selected.json``."""
    key = f"{grid.selection_task}/{SELECTION_SPLIT}"
    scores: dict[tuple[str, int], list[dict]] = {}
    for c in grid.candidates():
        result = json.loads((c.directory(out) / "metrics.json").read_text())["evaluations"][key]
        scores.setdefault((c.method, c.index), []).append(result)
    rows, chosen = [], {}
    for (method, index), results in scores.items():
        mean = {k: statistics.fmean(r[k] for r in results) for k in ("acc", "ece", "nll")}
        rows.append({"method": method, "setting": index,
                     "values": json.dumps(grid.search[method][index], sort_keys=True),
                     "dev_acc": mean["acc"], "dev_ece": mean["ece"], "dev_nll": mean["nll"],
                     "seeds": len(results)})
    for method in dict.fromkeys(r["method"] for r in rows):
        best = min((r for r in rows if r["method"] == method), key=lambda r: r["dev_nll"])
        chosen[method] = grid.search[method][best["setting"]]
        for r in rows:
            if r["method"] == method:
                r["chosen"] = r is best
    _write_csv(rows, out / "selection.csv")
    atomic_write_text(out / "selected.json", json.dumps(chosen, indent=2, sort_keys=True) + "\n")
    return chosen


def _write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)


def _with_cache_dir(config: FitConfig) -> FitConfig:
    return config if config.cache_dir is not None else replace(config, cache_dir=str(cache_dir() / "prefix"))


def _run_parallel(todo: list, jobs: int, log) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    views = {}  # per task, one pipeline per data view (training split; temperature scaling holds out 10 %)
    for _, config, _ in todo:
        views.setdefault(config.task, {}).setdefault((config.train_split, config.method == "temperature-scaling"),
                                                     config)
    failures = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        log(f"filling the frozen-block caches of {len(views)} tasks in {jobs} processes")
        for future in as_completed([pool.submit(_warm_caches, list(v.values())) for v in views.values()]):
            future.result()
        futures = {pool.submit(_run_cell, config, str(directory)): label for label, config, directory in todo}
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
                         **{f"point_{k}": result.get("point", {}).get(k) for k in POINT_METRICS},
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
              ("point_nll", 1, "NLL of the point prediction (posterior mean; Bayesian methods) ↓", columns),
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
            if metric.startswith("point_") and set(cells) == {"–"}:
                continue  # a method without a point prediction of its own
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
    _write_csv(rows, out / "results.csv")
    base = FitConfig.from_dict(grid.base)
    header = (f"{base.model} ({base.dtype}), `{base.format}` format, adapters on blocks {base.layers} "
              f"({base.target_modules}, rank {base.rank}), {base.steps} steps of {base.batch_size} questions, "
              f"train_limit {base.train_limit}, eval_limit {base.eval_limit}, seeds {grid.seeds}; mean ± std over seeds.")
    if grid.task_overrides:
        header += " Per task: " + "; ".join(f"{t} {_setting_text(v)}" for t, v in grid.task_overrides.items()) + "."
    settings = {m: grid.setting(m) for m in grid.methods if grid.setting(m)}
    if settings:
        seeds = grid.seeds[:grid.select_seeds]
        which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {seeds}"
        how = f" (chosen by dev NLL on {grid.selection_task}:{SELECTION_SPLIT}, {which})" if grid.selected else ""
        header += f" Settings{how}: " + "; ".join(f"{m} {_setting_text(v)}" for m, v in settings.items()) + "."
    atomic_write_text(out / "table.md", markdown_table(grid, rows, header))
    _reliability_figure(grid, out)


def _setting_text(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _reliability_figure(grid: Grid, out: Path) -> None:
    """``OUT/reliability_<task>.png`` per in-distribution task: one panel per method, from the first seed
    whose cell has its saved predictions here (a cell copied from another clone keeps only its metrics)."""
    from safetensors.torch import load_file

    from .metrics import plot_reliability_diagrams

    for task in grid.tasks:
        curves = {}
        for method in grid.methods:
            path = next((p for seed in grid.seeds
                         if (p := cell_dir(out, task, method, seed) / "predictions.safetensors").exists()), None)
            if path is not None:
                saved = load_file(path)
                key = next(k[: -len("/probs")] for k in saved if k.startswith(f"{task}/") and k.endswith("/probs"))
                curves[f"{method} ({path.parent.name})"] = (saved[f"{key}/probs"], saved[f"{key}/labels"])
        if curves:
            plot_reliability_diagrams(curves, out / f"reliability_{task}.png", title=task)
