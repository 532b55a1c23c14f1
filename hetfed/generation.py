"""Evaluating the generation task: perplexity of the references, ROUGE-L of greedy generations.

On the test split (at most ``data.max-test-examples`` examples), the global model is scored
twice (Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004):

- teacher forced, in one pass (:func:`hetfed.training.score`): the loss per reference target
  token (end token included), its perplexity exp(loss), and the exact match of greedy decoding;
- by greedy decoding from each prompt, at most ``model.max-new-tokens`` tokens, stopping at the
  end token: ROUGE-L F1 of each generation against its reference (the ``rouge-score`` package,
  Porter stemming), averaged over the examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer
from torch import nn

from hetfed.instructions import IGNORE, end_token_id
from hetfed.training import Encoded, Scores, autocast, model_device, score


@dataclass(frozen=True)
class Evaluation:
    """A central evaluation: the task's accuracy (exact match for the causal tasks) and loss;
    the generation task's ROUGE-L F1, perplexity and generated texts."""

    accuracy: float
    loss: float
    rouge_l: float | None = None
    perplexity: float | None = None
    generations: tuple[str, ...] = ()
    scores: Scores | None = None  # per example (saved for the final model's test split)
    rouge_l_scores: tuple[float, ...] = ()  # per example, the generation task

    @classmethod
    def of(cls, scores: Scores) -> Evaluation:
        """The evaluation of the classification and instruction tasks."""
        return cls(scores.accuracy, scores.loss, scores=scores)

    def examples(self) -> list[dict[str, float | int | bool]]:
        """One row per evaluated example: right or not, its loss per target and how many
        targets, its ROUGE-L F1 (generation): what a paired bootstrap resamples."""
        if self.scores is None:
            return []
        scores = self.scores
        rows = []
        for i, (right, total, count) in enumerate(
            zip(scores.correct, scores.loss_sums, scores.targets, strict=True)
        ):
            row = {"index": i, "correct": right, "loss": total / max(count, 1), "targets": count}
            if self.rouge_l_scores:
                row["rouge_l"] = self.rouge_l_scores[i]
            rows.append(row)
        return rows


def prompts_of(data: Encoded) -> list[list[int]]:
    """Each example's prompt: its tokens before the answer (left padding dropped)."""
    prompts = []
    for ids, mask, targets in zip(data.input_ids, data.attention_mask, data.labels, strict=True):
        start = int(mask.argmax())  # the first real token
        answer = int((targets != IGNORE).int().argmax())  # the first answer token
        prompts.append(ids[start:answer].tolist())
    return prompts


@torch.no_grad()
def greedy_generations(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    precision: str = "fp32",
) -> list[str]:
    """Greedy decoding of at most ``max_new_tokens`` tokens after each prompt (left-padded
    batches), up to the end token, decoded without special tokens; computed in ``precision``."""
    end = end_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    device, texts = model_device(model), []
    model.eval()
    for begin in range(0, len(prompts), batch_size):
        batch = prompts[begin : begin + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with autocast(precision, device):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=end,
                use_cache=True,
            )
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [text.strip() for text in texts]


def rouge_l_scores(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (rouge-score, stemmed)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 of ``predictions`` against ``references`` (:func:`rouge_l_scores`)."""
    return _mean(rouge_l_scores(predictions, references))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def evaluate_generation(
    model: nn.Module,
    data: Encoded,
    tokenizer,
    references: list[str],
    max_new_tokens: int,
    batch_size: int,
    precision: str = "fp32",
) -> Evaluation:
    """The generation task's evaluation (see the module), computed in ``precision``."""
    scores = score(model, data, batch_size, precision)
    prompts = prompts_of(data)
    generations = greedy_generations(
        model, tokenizer, prompts, max_new_tokens, batch_size, precision
    )
    per_example = rouge_l_scores(generations, references)
    return Evaluation(
        scores.accuracy,
        scores.loss,
        _mean(per_example),
        math.exp(scores.loss),
        tuple(generations),
        scores,
        tuple(per_example),
    )
