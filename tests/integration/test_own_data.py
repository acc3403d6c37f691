"""The issue's "done when": your own questions -> fit -> predict with uncertainty -> export -> plain transformers."""
import json

import pytest
import torch

from bayes_polar.cli import main

pytestmark = pytest.mark.integration

TRAIN = [  # written for this test, not from any benchmark
    {"question": "Which of these is a fruit?", "choices": ["carrot", "apple", "potato"], "answer": 1},
    {"question": "What colour is fresh snow?", "choices": ["white", "black"], "answer": "white"},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "answer": 1},
    {"question": "Which one is a musical instrument?", "choices": ["violin", "spoon", "chair"], "answer": 0,
     "id": "music"},
    {"question": "Is the kettle hot?", "choices": ["yes", "no"], "answer": "yes",
     "context": "The kettle has just boiled."},
]
NEW = [  # no answers; unequal choice counts
    {"question": "Which animal can fly?", "choices": ["eagle", "cow", "pig", "goat", "sheep"]},
    {"question": "What do you drink?", "choices": ["water", "sand"], "id": "drink"},
    {"question": "Which is a vegetable?", "choices": ["pea", "rock", "glass"]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _logits(model, tokenizer):
    batch = tokenizer(["Question: Which animal can fly?\nAnswer: eagle", "Answer:"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def test_own_questions_fit_predict_export(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from bayes_polar.predict import Predictor
    from bayes_polar.run import load_run

    train, new = _jsonl(tmp_path / "mine.jsonl", TRAIN), _jsonl(tmp_path / "new.jsonl", NEW)
    run, exp, preds = tmp_path / "run", tmp_path / "exported", tmp_path / "preds.jsonl"
    assert main(["fit", "--task", train, "--out", str(run), "--model", "tiny-random-llama", "--steps", "6",
                 "--batch-size", "5", "--layers", "-1", "--rank", "2", "--threads", "1", "--max-length", "64",
                 "--lr", "0.05", "--warmup-steps", "0", "--checkpoint-every", "0", "--quiet"]) == 0
    (tmp_path / "mine.jsonl").unlink()  # the run predicts without its training data
    assert main(["predict", str(run), "--input", new, "--output", str(preds)]) == 0
    assert "3 questions" in capsys.readouterr().out
    results = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [len(r["probabilities"]) for r in results] == [5, 2, 3] and results[1]["id"] == "drink"
    for r in results:
        assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-6)
        assert r["predicted_choice"] == r["choices"][r["prediction"]]
        assert r["confidence"] == max(r["probabilities"])
        assert min(r["entropy"], r["aleatoric"], r["epistemic"]) >= 0
        assert r["entropy"] == pytest.approx(r["aleatoric"] + r["epistemic"], abs=1e-9)
        assert r["logit_variance"] > 0 and r["novelty"] > 0  # polar-vbll: a Gaussian last layer
        assert "answer" not in r
    assert max(r["epistemic"] for r in results) > 0  # posterior draws disagree: the decomposition is not trivial

    predictor = Predictor.from_run(run)  # the Python one-liner: dicts or strings + choices
    again = predictor.predict([NEW[1]["question"]], choices=[NEW[1]["choices"]])[0]
    assert again["probabilities"] == pytest.approx(results[1]["probabilities"], abs=0.02)  # other draws, same φ

    labelled = _jsonl(tmp_path / "labelled.jsonl", TRAIN)
    assert main(["predict", str(run), "--input", labelled]) == 0  # with answers: the usual metrics too
    assert "5 with answers: ACC" in capsys.readouterr().err

    assert main(["export", str(run), "--out", str(exp)]) == 0
    pipe = load_run(run)
    merged, info = AutoModelForCausalLM.from_pretrained(exp / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (_logits(merged, pipe.tokenizer) - _logits(pipe.model, pipe.tokenizer)).abs().max() <= 1e-4


def test_a_registered_task_and_a_prior_object_reload(tmp_path):
    from bayes_polar.config import FitConfig
    from bayes_polar.data.user_tasks import REGISTERED, register_task
    from bayes_polar.errors import ConfigError
    from bayes_polar.models import IsotropicPrior
    from bayes_polar.predict import Predictor
    from bayes_polar.run import run_fit

    path = tmp_path / "pets.csv"
    path.write_text("prompt,a,b,c,gold\nWhich barks?,cat,dog,,dog\nWhich purrs?,cat,dog,fish,cat\n"
                    "Which swims?,fish,dog,,fish\n")
    register_task("pets", path, fields={"question": "prompt", "choices": ["a", "b", "c"], "answer": "gold"})
    try:
        config = FitConfig(model="tiny-random-llama", task="pets", steps=2, batch_size=3, layers=[-1], rank=2,
                           threads=1, max_length=48, checkpoint_every=0, warmup_steps=0,
                           prior=IsotropicPrior(variance=0.5))  # a prior object, as defined in a notebook
        metrics = run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    finally:
        REGISTERED.pop("pets")
    assert "reloading needs the same object" in metrics["python_objects"]["prior"]
    with pytest.raises(ConfigError, match="pass the same object again"):
        Predictor.from_run(tmp_path / "run")
    predictor = Predictor.from_run(tmp_path / "run", prior=IsotropicPrior(variance=0.5))
    result = predictor.predict("Which one meows?", choices=["cat", "cow"])[0]
    assert len(result["probabilities"]) == 2 and result["entropy"] >= result["aleatoric"] >= 0
