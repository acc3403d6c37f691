"""Predict with a finished run: probabilities per choice and the decomposition of predictive uncertainty.

``Predictor.from_run(run_dir).predict(questions)`` (``bayes-polar predict RUN_DIR --input q.jsonl``)
takes questions in the generic schema of :mod:`bayes_polar.data.user_tasks` (dicts, or strings with
``choices``; the answer is optional) and returns one dict per question:

- ``probabilities``: one per choice (questions may have different numbers of choices), summing to 1;
- ``prediction`` (index), ``predicted_choice`` (text) and ``confidence`` (its probability);
- ``entropy`` = H[E p] (total), ``aleatoric`` = E[H p] and ``epistemic`` = the mutual information
  H[E p] − E[H p], in nats, from the last layer's posterior draws (ensemble members, MC-dropout
  passes; 0 for point methods), so ``entropy = aleatoric + epistemic``;
- ``logit_variance`` and ``novelty`` (Var(z_c) / ‖φ_c‖²) for Gaussian last layers; ``answer`` and ``correct`` when the answer is given.

:func:`score` gives the usual metrics (acc, ece, nll, brier) of the questions that have answers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data.formats import make_loader
from .data.tasks import LETTERS, Task
from .data.user_tasks import load_user_task, parse_row, user_task_spec
from .errors import DataFormatError
from .evaluation.uncertainty import uncertainty_scores

SOURCE = "questions"


def questions_task(questions, choices=None) -> Task:
    """A :class:`Task` of the questions: dicts in the generic schema, or strings with ``choices``.

    ``choices`` is one list shared by every string question, or one list per question.
    """
    if isinstance(questions, (str, dict)):
        questions = [questions]
    questions = list(questions)
    if not questions:
        raise DataFormatError("no questions to predict")
    shared = choices is not None and all(isinstance(c, str) for c in choices)
    examples = []
    for i, item in enumerate(questions):
        if isinstance(item, str):
            if choices is None:
                raise DataFormatError(f"questions[{i}] is a string: pass choices=[...] (or dicts with 'choices')")
            item = {"question": item, "choices": list(choices) if shared else list(choices[i])}
        if not isinstance(item, dict):
            raise DataFormatError(f"questions[{i}]: expected a dict or a string, got {type(item).__name__}")
        try:
            examples.append(parse_row(None, item, default_id=str(i)))
        except (KeyError, ValueError, TypeError) as exc:
            raise DataFormatError(f"questions[{i}]: {exc.args[0] if exc.args else exc}") from None
    most = max(len(e.choices) for e in examples)
    return Task(SOURCE, "predict", examples, most, tuple(LETTERS[:most]), SOURCE)


class Predictor:
    """A loaded run that predicts questions with uncertainty (see the module docstring)."""

    def __init__(self, pipe, num_samples: int | None = None):
        self.pipe = pipe
        self.num_samples = num_samples or pipe.config.predictive_samples

    @classmethod
    def from_run(cls, run_dir, num_samples: int | None = None, prior=None, guide=None, device: str | None = None,
                 dtype: str | None = None) -> "Predictor":
        """Load ``run_dir`` (no training data needed); ``prior``/``guide``: its Python objects, if any;
        ``device``/``dtype``: where and in which precision the backbone runs (default: the run's)."""
        from .run import load_run

        return cls(load_run(run_dir, prior=prior, guide=guide, device=device, dtype=dtype), num_samples)

    @torch.no_grad()
    def predict(self, questions, choices=None) -> list[dict]:
        """One result dict per question (dicts in the generic schema, or strings with ``choices``)."""
        return self.predict_task(questions_task(questions, choices))

    def predict_file(self, path) -> list[dict]:
        """Predict every question of a ``.jsonl``/``.csv`` file in the generic schema (answers optional)."""
        spec = user_task_spec(str(path))
        if spec is None or not spec.single_file:
            raise DataFormatError(f"{path}: expected a .jsonl or .csv file of questions")
        return self.predict_task(load_user_task(spec, "test"))

    @torch.no_grad()
    def predict_task(self, task: Task) -> list[dict]:
        from .run import encode_for

        pipe = self.pipe
        encoded = encode_for(pipe, task)  # letters heads: a question with more choices than letters is refused
        loader = make_loader(encoded, pipe.tokenizer, batch_size=pipe.config.eval_batch_size)
        results = []
        with torch.random.fork_rng():
            torch.manual_seed(pipe.config.seed)  # the same draws for the same questions; the caller's RNG untouched
            for batch in loader:
                results.extend(self._batch_results(task, batch))
        return results

    def _batch_results(self, task: Task, batch) -> list[dict]:
        """Results of one batch: the method's draws (S, B, C), cut to each question's own choices."""
        drawn = self.pipe.method.predict_samples(batch, self.num_samples)
        scores = uncertainty_scores(drawn["samples"], drawn["mask"], drawn["logit_var"], drawn["feature_norm2"])
        mean = drawn["samples"].mean(0)
        results = []
        for row, index in enumerate(batch.indices.tolist()):
            example = task.examples[index]
            results.append(_result(example, mean[row, :len(example.choices)],
                                   {k: float(v[row]) for k, v in scores.items()}))
        return results


def _result(example, probs: torch.Tensor, scores: dict) -> dict:
    probs = probs.double() / probs.sum()
    prediction = int(probs.argmax())
    result = {"id": example.uid, "question": example.question, "choices": list(example.choices),
              "probabilities": [float(p) for p in probs], "prediction": prediction,
              "predicted_choice": example.choices[prediction], "confidence": float(probs[prediction]),
              "entropy": scores["entropy"], "aleatoric": scores["aleatoric"],
              "epistemic": scores["mutual_information"]}
    for name in ("logit_variance", "novelty"):  # Gaussian last layers only
        if name in scores:
            result[name] = scores[name]
    if example.label is not None:
        result["answer"] = example.label
        result["correct"] = prediction == example.label
    return result


def score(results: list[dict]) -> dict | None:
    """acc, ece, nll, brier (and n) of the results that carry an answer; None when none does."""
    from .evaluation.metrics import classification_metrics

    labelled = [r for r in results if "answer" in r]
    if not labelled:
        return None
    width = max(len(r["probabilities"]) for r in labelled)
    probs = torch.zeros(len(labelled), width)
    for i, r in enumerate(labelled):
        probs[i, :len(r["probabilities"])] = torch.tensor(r["probabilities"])
    metrics = classification_metrics(probs, torch.tensor([r["answer"] for r in labelled]))
    return {k: metrics[k] for k in ("acc", "ece", "nll", "brier", "n") if k in metrics}


def write_jsonl(results: list[dict], path) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in results))
