"""Checkpoints: round trip, exact RNG resume, corruption, fallback, pruning, crashes, run dirs."""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from bayes_polar.training import checkpoint as ck
from bayes_polar.training.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from bayes_polar.errors import BayesPolarWarning, CheckpointError, ConfigError


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"head.mu": torch.randn(4, 3, generator=g), "polar_X": torch.randn(8, 2, generator=g).double(),
            "count": torch.arange(5)}


def _save(run, step, **kw):
    return save_checkpoint(run, _tensors(step), {"step_seen": step}, step=step, **kw)


def _names(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- round trip
def test_round_trip_tensors_state_and_step(tmp_path):
    state = {"epoch": 3, "loss": 0.25, "nan": float("nan"), "cfg": {"lr": 1e-3, "modules": ("q", "v")},
             "opt": {"m": torch.ones(2, 2), "history": [torch.zeros(3), 1]}, "none": None, "opt/m": torch.eye(2)}
    path = save_checkpoint(tmp_path, _tensors(), state, step=7)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert sorted(os.listdir(path)) == ["manifest.json", "state.json", "state.safetensors", "tensors.safetensors"]
    for source in (tmp_path, tmp_path / "checkpoints", path):  # run dir, checkpoints dir, checkpoint dir
        tensors, loaded, step = load_checkpoint(source)
        assert step == 7 and tensors.keys() == _tensors().keys()
        assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in _tensors().items())
        assert loaded["cfg"] == {"lr": 1e-3, "modules": ["q", "v"]}  # tuples come back as lists
        assert torch.equal(loaded["opt"]["m"], torch.ones(2, 2)) and loaded["opt"]["history"][1] == 1
        assert torch.equal(loaded["opt/m"], torch.eye(2))  # a "/" in a key does not collide with nesting
        assert loaded["epoch"] == 3 and loaded["none"] is None and np.isnan(loaded["nan"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["step"] == 7 and "created" in manifest
    assert manifest["files"]["state.json"]["size"] == (path / "state.json").stat().st_size
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["checkpoint"] == "step-00000007"


def _draws():
    import pyro
    import pyro.distributions as dist

    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
            [random.random(), random.gauss(0, 1)], pyro.sample("z", dist.Normal(0.0, 1.0).expand([3])).tolist())


def test_rng_state_round_trip_resumes_exactly(tmp_path):
    random.gauss(0, 1)
    np.random.randn()  # leave a cached Gaussian in both, so it must be restored too
    save_checkpoint(tmp_path, {}, {"rng": rng_state()}, step=1)
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path)[1]["rng"])
    assert _draws() == expected


def test_rng_state_is_json_plus_tensors():
    state = rng_state()
    assert state["torch"].dtype == torch.uint8
    json.dumps({k: v for k, v in state.items() if k not in ("torch", "cuda")})


# ----------------------------------------------------------------------------- corruption
def _truncate(p):
    p.write_bytes(p.read_bytes()[:-10])


def _flip_byte(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("victim", "damage", "match"),
    [
        ("tensors.safetensors", _truncate, r"tensors\.safetensors has \d+ bytes but manifest\.json says"),
        ("tensors.safetensors", _flip_byte, r"tensors\.safetensors has sha256 .* \(corrupted\)"),
        ("state.json", _flip_byte, r"state\.json has sha256"),
        ("state.safetensors", os.remove, r"state\.safetensors is missing"),
        ("manifest.json", lambda p: p.write_text("{not json"), r"manifest\.json is not valid JSON"),
        ("manifest.json", os.remove, r"manifest\.json is missing"),
        ("manifest.json", lambda p: p.write_text('{"step": 2}'), r"manifest\.json lacks"),
    ],
)
def test_corruption_names_the_file_and_the_fix(tmp_path, victim, damage, match):
    previous = _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    damage(newest / victim)
    for call in (verify_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match=match) as info:
            call(newest)
        assert str(newest) in str(info.value) and f"resume from {previous}" in str(info.value)


def test_corrupt_without_a_valid_neighbour_says_start_again(tmp_path):
    only = _save(tmp_path, 1)
    _flip_byte(only / "tensors.safetensors")
    with pytest.raises(CheckpointError, match="start again"):
        load_checkpoint(only)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_checkpoint(tmp_path)


def test_manifest_from_a_newer_format_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99 is newer"):
        load_checkpoint(path)


def test_latest_falls_back_to_newest_valid_with_a_warning(tmp_path):
    _save(tmp_path, 1)
    good = _save(tmp_path, 2, keep=3)
    bad = _save(tmp_path, 3, keep=3)
    _truncate(bad / "tensors.safetensors")
    with pytest.warns(BayesPolarWarning, match=r"step-00000003.*falling back to .*step-00000002"):
        assert latest_checkpoint(tmp_path) == good
    with pytest.warns(BayesPolarWarning, match="falling back"):
        assert load_checkpoint(tmp_path)[2] == 2


def test_unreadable_latest_pointer_falls_back_to_scan(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest.json").write_text("garbage")
    with pytest.warns(BayesPolarWarning, match="latest.json"):
        assert latest_checkpoint(tmp_path) == newest


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="step-00000009 is unusable: it does not exist"):
        load_checkpoint(tmp_path / "checkpoints" / "step-00000009")


# ----------------------------------------------------------------------------- pruning and names
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_k(tmp_path, keep):
    for step in range(0, 50, 10):
        _save(tmp_path, step, keep=keep)
    expected = [f"step-{s:08d}" for s in range(0, 50, 10)][-keep:]
    assert _names(tmp_path) == sorted(expected + ["latest.json"])
    assert load_checkpoint(tmp_path)[2] == 40


def test_resaving_a_step_writes_a_new_directory_and_loads_the_newest(tmp_path):
    _save(tmp_path, 5)
    second = save_checkpoint(tmp_path, _tensors(), {"version": "second"}, step=5)
    assert second.name == "step-00000005-1"
    assert load_checkpoint(tmp_path)[1] == {"version": "second"}


def test_steps_going_backwards_prune_by_creation_order(tmp_path):
    for step in (10, 20, 15):  # e.g. resumed from step 10 after 20 went bad
        _save(tmp_path, step)
    assert _names(tmp_path) == ["latest.json", "step-00000015", "step-00000020"]
    assert load_checkpoint(tmp_path)[2] == 15


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": -1}, ValueError, "step >= 0"),
        ({"step": 1.5}, ValueError, "step >= 0"),
        ({"step": 1, "keep": 0}, ValueError, "keep >= 1"),
        ({"step": 1, "state": {1: "int key"}}, TypeError, "keys must be str"),
        ({"step": 1, "state": {"x": object()}}, TypeError, r"state'/x': object is not JSON-able"),
        ({"step": 1, "tensors": {"w": [1.0]}}, TypeError, r"dict\[str, Tensor\]"),
    ],
)
def test_save_validates_arguments(tmp_path, kwargs, error, match):
    args = {"tensors": _tensors(), "state": {}, **kwargs}
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path, args.pop("tensors"), args.pop("state"), **args)
    assert not (tmp_path / "checkpoints").exists() or _names(tmp_path) == []


# ----------------------------------------------------------------------------- crashes
def _failing_replace(monkeypatch, fail_on_call):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_on_call:
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_crash_before_publishing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    _failing_replace(monkeypatch, fail_on_call=1)  # the directory rename
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert _names(tmp_path) == ["latest.json", "step-00000001"]  # no .tmp-* left behind
    assert load_checkpoint(tmp_path)[2] == 1


def test_crash_before_updating_latest_loads_the_old_or_new_one(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    _failing_replace(monkeypatch, fail_on_call=2)  # the latest.json rename
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]
    tensors, state, step = load_checkpoint(tmp_path)
    assert step == 1 and state == {"step_seen": 1}  # the pointer still names the old one, intact


def test_leftover_temp_dir_of_a_killed_process_is_ignored_then_cleaned(tmp_path):
    _save(tmp_path, 1)
    leftover = tmp_path / "checkpoints" / ".tmp-step-00000002-dead"
    leftover.mkdir()
    (leftover / "tensors.safetensors").write_bytes(b"half")
    assert load_checkpoint(tmp_path)[2] == 1
    _save(tmp_path, 3)
    assert not leftover.exists()


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "first")
    atomic_write_text(tmp_path / "a.txt", "second")
    atomic_write_json(tmp_path / "m.json", {"acc": 0.5, "n": 3})
    assert (tmp_path / "a.txt").read_text() == "second"
    assert json.loads((tmp_path / "m.json").read_text()) == {"acc": 0.5, "n": 3}
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "m.json"]


def test_failed_atomic_write_keeps_old_content(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "config.json", {"lr": 1})
    _failing_replace(monkeypatch, fail_on_call=1)
    with pytest.raises(OSError):
        atomic_write_json(tmp_path / "config.json", {"lr": 2})
    monkeypatch.undo()
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1}
    assert os.listdir(tmp_path) == ["config.json"]
    with pytest.raises(TypeError):  # not JSON-able: nothing written at all
        atomic_write_json(tmp_path / "config.json", {"lr": object()})
    assert os.listdir(tmp_path) == ["config.json"]


# ----------------------------------------------------------------------------- run directories
def test_run_dir_creation_and_refusal(tmp_path):
    run = prepare_run_dir(tmp_path / "runs" / "a")
    assert run.is_dir() and prepare_run_dir(run) == run  # only the marker inside: still "empty"
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="pass --overwrite .* or --resume"):
        prepare_run_dir(run)
    assert (run / "metrics.json").exists()
    with pytest.raises(ConfigError, match="exclude each other"):
        prepare_run_dir(run, overwrite=True, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_run_dir(tmp_path / "file", resume=True)


def test_a_run_stopped_by_bad_input_before_its_first_step_can_be_rerun(tmp_path):
    """fit writes config.json, then meets bad input (a broken prior file, a malformed row): the corrected
    command reuses RUN_DIR without --overwrite, since nothing was computed."""
    run = prepare_run_dir(tmp_path / "run")
    (run / "config.json").write_text("{}")
    assert prepare_run_dir(run) == run
    (tmp_path / "mine").mkdir()  # but a folder we did not create (no marker) is never taken over
    (tmp_path / "mine" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_run_dir(tmp_path / "mine")


def test_run_dir_resume_keeps_contents(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    _save(run, 3)
    assert prepare_run_dir(run, resume=True) == run
    assert load_checkpoint(run)[2] == 3


def test_run_dir_overwrite_replaces_contents_only_after_the_new_one_exists(tmp_path, monkeypatch):
    run = prepare_run_dir(tmp_path / "run")
    (run / "old.txt").write_text("old")
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # when the old run is deleted, the new one must be ready
        assert run.is_dir() and (run / ck.RUN_MARKER).exists() and not (run / "old.txt").exists()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert prepare_run_dir(run, overwrite=True) == run
    assert os.listdir(run) == [ck.RUN_MARKER]
    assert os.listdir(tmp_path) == ["run"]  # nothing left aside


def test_run_dir_overwrite_interrupted_keeps_old_data_aside(tmp_path, monkeypatch):
    run = prepare_run_dir(tmp_path / "run")
    (run / "old.txt").write_text("old")
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        prepare_run_dir(run, overwrite=True)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (aside / "old.txt").read_text() == "old"


def test_run_dir_overwrite_refuses_a_directory_it_did_not_create(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        prepare_run_dir(precious, overwrite=True)
    assert (precious / "thesis.tex").exists()
