"""The generation task: targets, ROUGE-L and perplexity on hand-made cases, checks before any
model loads, and a run through flwr run whose exported adapter generates what the server did."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch
from peft import PeftModel
from torch import nn

from hetfed.data import load_splits
from hetfed.data_config import DataConfig
from hetfed.errors import ConfigError
from hetfed.generation import (
    evaluate_generation,
    greedy_generations,
    prompts_of,
    rouge_l,
)
from hetfed.instructions import IGNORE, encode_generation, end_token_id
from hetfed.models import GENERATION, ModelConfig, build_model, load_tokenizer
from hetfed.results import read_metrics
from hetfed.training import Encoded, encode_split
from server_apps.run_plan import plan_run
from tests.conftest import TINY_PROFILES

TINY = ModelConfig(
    name="tiny-random-llama", task=GENERATION, max_length=48, prompt="Title?", max_new_tokens=8
)
WORDS = "market shares profit goal match team chip phone code vote party law".split()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY.name)


def write_pairs(folder, count=240, seed=0):
    """train.csv/test.csv with columns body,title: each title is the body's first three words,
    a target a tiny model can learn to copy."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", count), ("test", count // 4)):
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["body", "title"])
            for _ in range(rows):
                body = [rng.choice(WORDS) for _ in range(12)]
                writer.writerow([" ".join(body), " ".join(body[:3])])
    return folder


def test_targets_are_exactly_the_target_tokens_and_the_end_token(tokenizer):
    texts = ["shares fell sharply " * 30, "a short one"]
    targets = ["Markets slide", "x " * 50]  # the second is cut to max_new_tokens - 1 tokens
    input_ids, mask, labels = encode_generation(texts, targets, tokenizer, 48, "Title?", 8)
    end = end_token_id(tokenizer)
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"][:7] + [end] for t in targets]
    for i, answer in enumerate(expected):
        assert labels[i][labels[i] != IGNORE].tolist() == answer
        assert input_ids[i, -len(answer) :].tolist() == answer  # the answer ends the row
        assert int(mask[i].sum()) <= 48
    # the long text was cut to leave room for the longest target: 48 - 8 + its own answer
    assert int(mask[0].sum()) == 48 - 8 + len(expected[0])


def test_rouge_l_on_hand_made_cases():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    # LCS "the cat on mat" = 4: precision 4/4, recall 4/6, F1 0.8
    assert rouge_l(["the cat on mat"], ["the cat sat on the mat"]) == pytest.approx(0.8)
    assert rouge_l(["dogs bark"], ["the cat sat"]) == 0.0
    assert rouge_l(["a b", "a b"], ["a b", "c d"]) == pytest.approx(0.5)  # the mean over examples


class Uniform(nn.Module):
    """A language model whose next-token distribution is uniform over ``vocab`` tokens."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        keep = logits_to_keep or input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], keep, self.vocab) + self.weight
        return type("Output", (), {"logits": logits})()


def test_perplexity_is_the_exponent_of_the_loss_per_target_token(tokenizer):
    """Under a uniform next-token distribution every target token costs log V: perplexity V."""
    vocab = len(tokenizer)
    data = Encoded(
        *encode_generation(["one two three"] * 3, ["four five"] * 3, tokenizer, 48, "T", 8)
    )
    model = Uniform(vocab)
    model.generate = lambda **kw: kw["input_ids"]  # decodes nothing: ROUGE-L 0
    scores = evaluate_generation(model, data, tokenizer, ["four five"] * 3, 8, batch_size=2)
    assert scores.loss == pytest.approx(math.log(vocab), rel=1e-5)
    assert scores.perplexity == pytest.approx(vocab, rel=1e-4) and scores.rouge_l == 0.0


def test_greedy_generations_are_what_model_generate_gives(tokenizer):
    model, _ = build_model(TINY, 1, seed=0)
    data = Encoded(
        *encode_generation(
            ["market shares profit", "goal match"], ["a", "b"], tokenizer, 48, "T", 8
        )
    )
    prompts = prompts_of(data)
    assert prompts[1] == data.input_ids[1][data.labels[1] == IGNORE][-len(prompts[1]) :].tolist()
    texts = greedy_generations(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    for prompt, text in zip(prompts, texts, strict=True):
        alone = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=5, do_sample=False, use_cache=True,
            pad_token_id=end_token_id(tokenizer), eos_token_id=end_token_id(tokenizer),
        )  # fmt: skip
        decoded = tokenizer.decode(alone[0, len(prompt) :], skip_special_tokens=True).strip()
        assert text == decoded


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"model.max-new-tokens": 0}, "model.max-new-tokens"),
        ({"data.target-column": "headline"}, "data.target-column"),
        ({"data.target-column": "", "data.input-column": ""}, "data.target-column"),
        ({"model.task": "instruction"}, "data.target-column"),
        (
            {
                "model.task": "classification",
                "data.source": "bbc-news-headlines",
                "data.input-column": "",
                "data.target-column": "",
            },
            "data.source",
        ),
        ({"model.max-length": 12}, "model.max-length"),
    ],
)
def test_bad_generation_keys_fail_before_any_model_loads(tmp_path, tiny_config, override, key):
    (tmp_path / "profiles.yaml").write_text(TINY_PROFILES)
    config = {**generation_config(write_pairs(tmp_path / "pairs"), tiny_config), **override}
    with pytest.raises(ConfigError) as err:
        plan_run(config, tmp_path)
    assert err.value.key == key


def generation_config(folder, tiny_config) -> dict:
    return {
        **tiny_config,
        "model.name": "tiny-random-llama",
        "model.task": GENERATION,
        "model.prompt": "Write the title.",
        "model.max-length": 48,
        "model.max-new-tokens": 8,
        "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "data.source": str(folder),
        "data.input-column": "body",
        "data.target-column": "title",
        "data.max-test-examples": 24,
        "train.lr": 0.01,
    }


@pytest.mark.slow
def test_generation_end_to_end(run_scenario, tiny_config, tmp_path):
    """A tiny LLaMA learns to write titles through flwr run: the target loss falls, ROUGE-L and
    perplexity are recorded, and the exported adapter, loaded with plain peft, generates
    exactly what the server's final evaluation generated."""
    folder = write_pairs(tmp_path / "pairs")
    config = {**generation_config(folder, tiny_config), "num-server-rounds": 4}
    config["train.local-steps"] = 30
    # measured: the loss falls to 0.48 of round 0's (3 rounds at lr 0.01 stopped at 0.61, on
    # the bound, once the seed tree drew another model and partition)
    config["train.lr"] = 0.02
    proc, results = run_scenario(config)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rounds = read_metrics(results)
    assert rounds[-1]["loss"] < 0.6 * rounds[0]["loss"]  # round 0: the untrained adapter
    assert all(0 <= r["rouge_l"] <= 1 for r in rounds)
    assert rounds[-1]["perplexity"] == pytest.approx(math.exp(rounds[-1]["loss"]))
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final_rouge_l"] == rounds[-1]["rouge_l"]
    served = [json.loads(line) for line in (results / "generations.jsonl").read_text().splitlines()]
    splits = load_splits(
        DataConfig(
            source=str(folder),
            input_column="body",
            target_column="title",
            max_test_examples=24,
            seed=config["seed"],  # a run's data.seed is its seed
        )
    )
    assert [s["reference"] for s in served] == list(splits.test["target"])
    cfg = ModelConfig(
        name="tiny-random-llama", task=GENERATION, max_length=48,
        prompt="Write the title.", max_new_tokens=8,
    )  # fmt: skip
    base, tokenizer = build_model(cfg, len(splits.label_names), seed=config["seed"])
    model = PeftModel.from_pretrained(base, results / "adapter")
    test = encode_split(cfg, splits.test, splits.label_names, tokenizer)
    texts = greedy_generations(model, tokenizer, prompts_of(test), 8, batch_size=64)
    assert texts == [s["generation"] for s in served]
    assert rouge_l(texts, [s["reference"] for s in served]) == pytest.approx(rounds[-1]["rouge_l"])
