"""A harness for strategy tests: real Flower messages, explicit client replies.

The ClientApp is replaced by reply functions so each aggregation rule can be checked exactly on
random arrays; the end-to-end tests run the real ClientApp through the Simulation Engine.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from hetfed import adapter_state, wire
from hetfed.config import LoraSettings, RunSettings
from hetfed.profiles import parse_profiles

PROFILES = parse_profiles(
    "tiers: {s: {rank: 2}, m: {rank: 4}, l: {rank: 8}}\nassignment: {by-partition: [s, m, l]}"
)
MODULES = ("layer.0.query", "layer.0.value", "layer.1.query")
D_OUT, D_IN, LABELS = 12, 10, 3


class InProcessGrid:
    """Flower's Grid interface over nodes ``first_node``, ``first_node + 1``, ... (client ids 0,
    1, ... unless ``client_ids`` names them) that answer budget queries like the ClientApp, with
    the tiers of ``profiles``. Train messages are answered by ``train(client, msg)`` (a
    ``RecordDict``, or None for a reply that never comes), when given."""

    def __init__(
        self, tiers=("s", "m", "l"), profiles=PROFILES, train=None, first_node=1000, client_ids=None
    ):
        self.tiers = {first_node + i: t for i, t in enumerate(tiers)}
        ids = client_ids if client_ids is not None else range(first_node, first_node + len(tiers))
        self.client_ids = dict(zip(self.tiers, ids, strict=True))
        self.profiles = profiles
        self.train = train

    def get_node_ids(self):
        return list(self.tiers)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.TRAIN:
                content = self.train(self.client_ids[node], msg)
            else:
                tier = self.profiles.tier(self.tiers[node])
                budget = wire.BudgetReply(tier.name, tier.rank, self.client_ids[node])
                content = RecordDict({wire.BUDGET: budget.to_record()})
            if content is not None:
                replies.append(_reply(msg, content))
        return replies


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)  # its source is the node the message went to


def global_state(rng, rank=8, modules=MODULES):
    state = {}
    for m in modules:
        state[f"{m}.lora_A.weight"] = rng.normal(size=(rank, D_IN)).astype(np.float32)
        state[f"{m}.lora_B.weight"] = rng.normal(size=(D_OUT, rank)).astype(np.float32)
    state["classifier.weight"] = rng.normal(size=(LABELS, D_OUT)).astype(np.float32)
    state["classifier.bias"] = rng.normal(size=(LABELS,)).astype(np.float32)
    return state


def make(strategy_cls, options, rescale=True, scaling="standard"):
    """A strategy on the harness profiles; ``rescale=False`` is the unconverted rule (the
    authors' codes), under which a reply's factors are aggregated exactly as they arrive."""
    lora = LoraSettings(rescale=rescale, scaling=scaling)
    settings = RunSettings(min_train_nodes=1, min_available_nodes=3, lora=lora)
    return strategy_cls(settings, PROFILES, options)


def sent_layers(msg) -> list[int] | None:
    """The transformer blocks a train message tells its client to train (None: all)."""
    config = msg.content[wire.CONFIG]
    return list(config[wire.LAYERS]) if wire.LAYERS in config else None


def train_round(strategy, state, reply_fn, server_round=1, grid=None, with_layers=False):
    """configure_train -> replies made by ``reply_fn(node, rank, sent_arrays)`` (and the sent
    layers when ``with_layers``) -> aggregate; on ``grid`` or the strategy's in-process one."""
    grid = grid or InProcessGrid(profiles=strategy.profiles)
    messages = list(
        strategy.configure_train(server_round, wire.to_record(state), ConfigRecord(), grid)
    )
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        rank = int(msg.content[wire.CONFIG][wire.RANK])
        sent = (node, rank, wire.from_record(msg.content[wire.ARRAYS]))
        content = reply_fn(*sent, sent_layers(msg)) if with_layers else reply_fn(*sent)
        replies.append(_reply(msg, content))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return messages, (wire.from_record(arrays) if arrays is not None else None)


def sent_product(msg, module):
    """What a train message gives its client for ``module``: (rank, s_k, s_k B_k A_k in
    float64), s_k the scaling it is told to train at."""
    config = msg.content[wire.CONFIG]
    rank, scaling = int(config[wire.RANK]), float(config[wire.LORA_SCALING])
    arrays = wire.from_record(msg.content[wire.ARRAYS])
    b = arrays[f"{module}.lora_B.weight"].astype(np.float64)
    a = arrays[f"{module}.lora_A.weight"].astype(np.float64)
    assert b.shape[1] == a.shape[0] == rank
    return rank, scaling, scaling * b @ a


def random_replies(rng, ranks, d_out, d_in):
    """One LoRA module "m" per reply: float32 random factors of the given ranks."""
    return [
        {
            "m": (
                rng.normal(size=(d_out, r)).astype(np.float32),
                rng.normal(size=(r, d_in)).astype(np.float32),
            )
        }
        for r in ranks
    ]


def trained(rng, n_examples=None, rank_override=None, mutate=None):
    """A reply function returning random 'trained' arrays of the sent shapes."""
    sent = {}

    def reply(node, rank, arrays):
        r = rank_override(node, rank) if rank_override else rank
        new = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in arrays.items()}
        if r != rank:
            new = adapter_state.truncate_state(new, r)
        if mutate:
            new = mutate(node, new)
        sent[node] = new
        examples = n_examples[node] if n_examples else 10
        metrics = wire.TrainReply(num_examples=examples, train_loss=1.0, rank=r).to_record()
        return RecordDict({wire.ARRAYS: wire.to_record(new), wire.METRICS: metrics})

    return reply, sent


def topic_server(model_config, settings, texts, public_examples, test_examples):
    """A ServerModel of a fresh classifier (seed 0) over the conftest topics, with a public and a
    test split of ``texts(rng, n)`` drawn in that order from one generator seeded 0."""
    from hetfed.adapters import AdapterHost
    from hetfed.models import build_classifier
    from hetfed.server_model import ServerModel
    from hetfed.training import encode
    from tests.conftest import TOPICS

    model, tokenizer = build_classifier(model_config, len(TOPICS), seed=0)
    rng = np.random.default_rng(0)
    public = encode(*texts(rng, public_examples), tokenizer, model_config.max_length)
    test = encode(*texts(rng, test_examples), tokenizer, model_config.max_length)
    return ServerModel(settings, AdapterHost(model), test, public)


def sparsity_weighted_padding(pairs, modules, r_max=8):
    """HetLoRA's rule written out, the oracle of the tests: w_k = S_k / sum(S) with
    S_k = sqrt(sum_m ||B_k A_k||_F^2) over ``modules``; per module (sum_k w_k pad(B_k),
    sum_k w_k pad(A_k)), the factors zero-padded to ``r_max``."""
    s = np.array(
        [np.sqrt(sum(np.linalg.norm(p[m][0] @ p[m][1]) ** 2 for m in modules)) for p in pairs]
    )
    w = s / s.sum()
    expected = {}
    for m in modules:
        b = sum(
            wk * np.pad(p[m][0], ((0, 0), (0, r_max - p[m][0].shape[1])))
            for wk, p in zip(w, pairs, strict=True)
        )
        a = sum(
            wk * np.pad(p[m][1], ((0, r_max - p[m][1].shape[0]), (0, 0)))
            for wk, p in zip(w, pairs, strict=True)
        )
        expected[m] = (b, a)
    return expected
