"""Prompts and answers for a causal LM: the instruction and the generation tasks.

``model.task = instruction``: labelled texts as prompts whose answer is the label's name.
``model.task = generation``: (input, target) pairs, the target a free-form text (at most
``model.max-new-tokens`` tokens, end token included) after ``model.prompt``.

Each example becomes a chat turn in the FLAN style (Wei et al., ICLR 2022, whose mixture holds
classification datasets such as AG News rewritten as instructions): ``model.prompt`` is the
system message (it replaces a template's default one; in the user message when the template has
no system role), the text is the user message, and the assistant answers with the label's name
(or the target) followed by the end-of-turn token. A causal LM is trained with the next-token
loss on the answer tokens only.

Evaluation is teacher forced, in one forward pass: the loss is the mean cross-entropy per answer
token, and an example is correct when the model's most likely next token is the answer's at
every answer position, end token included. That is exactly "greedy decoding from the prompt
produces the answer and stops", without running a decoder loop. The generation task also
decodes greedily for ROUGE-L (:mod:`hetfed.generation`).

Sequences are padded on the left, so every answer ends in the last column: the model computes
next-token logits for the last few positions only (``logits_to_keep``), not a vocabulary-wide
row for every prompt token (:func:`hetfed.training.task_forward`).
"""

from __future__ import annotations

import torch

from hetfed.errors import ConfigError

IGNORE = -100  # target of a position without loss (prompt, padding): torch's ignore_index
_TEXT = "\x00text\x00"  # stands for the text while the template is split around it
_PLAIN_TEMPLATE = f"{{prompt}}\n\n{_TEXT}\n\nAnswer: "  # tokenizers without a chat template
_MIN_TEXT_TOKENS = 8


def _prompt_pieces(tokenizer, request: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt before and after the text, with the tokenizer's chat template
    (generation prompt included) when it has one."""
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "system", "content": request}, {"role": "user", "content": _TEXT}]
        try:
            prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates raise their own errors for a system turn
            chat = [{"role": "user", "content": f"{request}\n\n{_TEXT}"}]
            prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    else:
        prompt = _PLAIN_TEMPLATE.format(prompt=request)
    before, after = prompt.split(_TEXT)
    return _ids(tokenizer, before), _ids(tokenizer, after)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def end_token_id(tokenizer) -> int:
    """The token that ends an answer: the end-of-sequence token (a chat model's end of turn),
    else the separator token of BERT-style tokenizers."""
    token = tokenizer.eos_token_id
    token = tokenizer.sep_token_id if token is None else token
    if token is None:
        raise ConfigError("model.name", tokenizer.name_or_path, "a tokenizer with an eos token")
    return int(token)


def answer_ids(tokenizer, label_names: list[str]) -> list[list[int]]:
    """The answer of each label: its name's tokens and the end token."""
    return [_ids(tokenizer, name) + [end_token_id(tokenizer)] for name in label_names]


def prompt_layout(
    tokenizer, label_names: list[str], max_length: int, prompt: str
) -> tuple[list[int], list[int], list[list[int]], int]:
    """The prompt's ids before and after the text, each label's answer, and the room (tokens)
    left for a text; a :class:`ConfigError` naming ``model.max-length`` if it is too small."""
    request = prompt.replace("{labels}", ", ".join(label_names))
    before, after = _prompt_pieces(tokenizer, request)
    answers = answer_ids(tokenizer, label_names)
    return before, after, answers, _room(max_length, before, after, max(map(len, answers)))


def generation_layout(
    tokenizer, max_length: int, prompt: str, max_new_tokens: int
) -> tuple[list[int], list[int], int]:
    """The generation task's prompt ids before and after the input text, and the room left for
    the input when the target may take ``max_new_tokens`` (its end token included)."""
    before, after = _prompt_pieces(tokenizer, prompt)
    return before, after, _room(max_length, before, after, max_new_tokens)


def _room(max_length: int, before: list[int], after: list[int], answer: int) -> int:
    room = max_length - len(before) - len(after) - answer
    if room < _MIN_TEXT_TOKENS:
        raise ConfigError(
            "model.max-length",
            max_length,
            f"an integer >= {max_length - room + _MIN_TEXT_TOKENS} (the prompt template and the "
            f"longest answer take {max_length - room} tokens, a text needs at least "
            f"{_MIN_TEXT_TOKENS})",
        )
    return room


def target_ids(tokenizer, targets: list[str], max_new_tokens: int) -> list[list[int]]:
    """Each target's tokens, cut to ``max_new_tokens - 1``, and the end token."""
    ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"] if targets else []
    return [t[: max_new_tokens - 1] + [end_token_id(tokenizer)] for t in ids]


def encode_instructions(
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    tokenizer,
    max_length: int,
    prompt: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, targets)`` of prompt + answer sequences, left-padded.

    ``targets[i, t]`` is the token at position t where t is in example i's answer, else
    :data:`IGNORE`; position t-1 predicts it. A text is cut (its end) so that the prompt and the
    longest answer fit ``max_length`` tokens.
    """
    before, after, answers, room = prompt_layout(tokenizer, label_names, max_length, prompt)
    return _encode(tokenizer, texts, [answers[label] for label in labels], before, after, room)


def encode_generation(
    texts: list[str],
    targets: list[str],
    tokenizer,
    max_length: int,
    prompt: str,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`encode_instructions`, each example's answer its own target text (at most
    ``max_new_tokens`` tokens with the end token)."""
    before, after, room = generation_layout(tokenizer, max_length, prompt, max_new_tokens)
    answers = target_ids(tokenizer, targets, max_new_tokens)
    return _encode(tokenizer, texts, answers, before, after, room)


def _encode(
    tokenizer, texts: list[str], answers: list[list[int]], before, after, room: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt (the text cut to ``room`` tokens) + answer sequences, the targets on
    the answer tokens only."""
    text_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    sequences, starts = [], []
    for ids, answer in zip(text_ids, answers, strict=True):
        prompt_ids = before + ids[:room] + after
        sequences.append(prompt_ids + answer)
        starts.append(len(prompt_ids))
    width = max((len(s) for s in sequences), default=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token_id(tokenizer)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for i, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
        offset = width - len(sequence)
        input_ids[i, offset:] = torch.tensor(sequence)
        attention_mask[i, offset:] = 1
        targets[i, offset + start :] = torch.tensor(sequence[start:])
    return input_ids, attention_mask, targets
