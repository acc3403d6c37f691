"""A finished run predicts with its training data gone: load_run reads only RUN_DIR."""
import json
import shutil

import pytest
import torch

from bayes_polar.config import FitConfig
from bayes_polar.data.tasks import load_task
from bayes_polar.run import encode_for, load_run, predict, run_fit
from bayes_polar.training.manifest import write_manifest

pytestmark = pytest.mark.integration

QUESTIONS = [
    {"question": "What melts ice fastest?", "choices": ["salt", "sand", "paper"]},
    {"question": "Which animal lays eggs?", "choices": ["dog", "hen"]},
]


def _tiny(data_dir, method, **overrides):
    values = dict(model="tiny-random-llama", task="arc_easy", data_dir=str(data_dir), train_limit=12, eval_limit=6,
                  steps=3, batch_size=4, layers="-1", rank=2, alpha=4, threads=1, checkpoint_every=0,
                  max_length=64, eval_batch_size=8, predictive_samples=32, warmup_steps=1, method=method,
                  ensemble_size=2, mc_passes=2)
    values.update(overrides)
    return FitConfig(**values)


@pytest.mark.parametrize("method,format", [("polar-vbll", "options"), ("lora-mle", "letters"),
                                           ("lora-ensemble", "options"), ("lora-mcdropout", "letters")])
def test_load_run_needs_no_training_data(tmp_path, data_dir, method, format):
    mirror = tmp_path / "mirror"
    (mirror / "arc_easy").mkdir(parents=True)
    for split in ("train", "validation"):
        lines = (data_dir / "arc_easy" / f"{split}.jsonl").read_text().splitlines()[:12]
        (mirror / "arc_easy" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    run_fit(_tiny(mirror, method, format=format), tmp_path / "run", progress=False, log=lambda *_: None)
    assert {"layout.json", "zero_shot.safetensors"} <= {p.name for p in (tmp_path / "run").iterdir()}

    def probabilities():
        pipe = load_run(tmp_path / "run")
        encoded = encode_for(pipe, load_task(str(questions), "test"))
        torch.manual_seed(0)
        return predict(pipe, encoded, 32)

    before = probabilities()
    shutil.rmtree(mirror)
    after = probabilities()
    for key in ("predictive", "point", "zero_shot"):
        assert torch.allclose(before[key], after[key], atol=1e-6), key
    assert torch.allclose(after["predictive"].sum(-1), torch.ones(2))

    from bayes_polar.predict import Predictor

    results = Predictor.from_run(tmp_path / "run").predict(QUESTIONS)
    assert [len(r["probabilities"]) for r in results] == [3, 2]  # no padding column, letters head or not
    for r, expected in zip(results, after["predictive"]):
        assert r["probabilities"] == pytest.approx(expected[:len(r["probabilities"])].tolist(), abs=0.05)
        assert r["entropy"] == pytest.approx(r["aleatoric"] + r["epistemic"], abs=1e-9)
    spread = max(r["epistemic"] for r in results)
    assert spread == 0 if method == "lora-mle" else spread > 0  # members, dropout passes, posterior draws
    if method == "polar-vbll":  # a run reloaded on another backbone is refused, naming its layout file
        from bayes_polar.errors import ConfigError

        layout = tmp_path / "run" / "layout.json"
        values = json.loads(layout.read_text())
        layout.write_text(json.dumps({**values, "hidden_size": values["hidden_size"] + 1}))
        write_manifest(tmp_path / "run", ["adapters.safetensors", "head.safetensors", "layout.json",
                                          "zero_shot.safetensors"])  # a consistent run of another backbone
        with pytest.raises(ConfigError, match=r"layout.json: the run was trained on 'tiny-random-llama'"):
            load_run(tmp_path / "run")
