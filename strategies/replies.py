"""Training replies: what a client was sent, and whether what it returned can be aggregated.

A reply is untrusted input. :func:`decode_reply` turns a valid one into a :class:`ClientUpdate`
and names what is wrong with any other: wrong keys, factors of a rank it may not return, wrong
outer shapes, non-float or non-finite values, an update larger than ``max-update-norm``, missing
or malformed metrics, or a client that was not sent anything. Nothing in a reply may raise past
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from logging import WARNING

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.common.logger import log

from hetfed import adapter_state, wire
from hetfed.adapter_state import LORA_A, LORA_B, LoraPairs, State
from hetfed.config import RunSettings
from hetfed.lora_algebra import normalize_weights
from hetfed.results import RoundStats
from hetfed.scaling import rescale_state


@dataclass
class ClientUpdate:
    """One valid training reply, decoded.

    Its LoRA product means ``scaling * B A``: with ``lora.rescale`` the base has converted B to
    the scaling of the global adapter (:meth:`~strategies.base.LoRAStrategy.source_scaling`),
    otherwise it is the scaling the client trained at.
    """

    client_id: int
    num_examples: int
    rank: int
    state: State
    metrics: dict[str, float]
    scaling: float

    @cached_property  # aggregation asks for it once per module
    def lora(self) -> LoraPairs:
        return adapter_state.split_state(self.state)[0]

    @cached_property
    def head(self) -> State:
        return adapter_state.split_state(self.state)[1]

    def restricted(self, modules: list[str]) -> ClientUpdate:
        """This update with only the given LoRA modules (and the head); itself when those are
        all its modules (no new state to split again)."""
        if set(modules) == self.lora.keys():
            return self
        state = adapter_state.join_state({m: self.lora[m] for m in modules}, self.head)
        return ClientUpdate(
            self.client_id, self.num_examples, self.rank, state, self.metrics, self.scaling
        )


@dataclass(frozen=True)
class SentAdapter:
    """What one client was sent this round, to check and convert its reply."""

    rank: int
    expected: State  # the arrays it must return (shapes; the sent values for the norm bound)
    scaling: float  # s_k, the scaling it trains at
    source_scaling: float  # s_g of the global adapter its arrays were cut from


def reply_problem(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], rank: int):
    """Why a client's arrays cannot be aggregated, or None when they can.

    The reply must have exactly the keys that were sent, LoRA factors of the claimed ``rank``
    with the sent outer dimensions, head arrays of the sent shapes, float dtypes and finite values.
    """
    missing = sorted(set(sent) - set(reply))
    if missing:
        return f"missing arrays {missing[:3]}"
    extra = sorted(set(reply) - set(sent))
    if extra:
        return f"unexpected arrays {extra[:3]}"
    for key, value in reply.items():
        ref = sent[key]
        factor = adapter_state.factor_of(key)
        if factor == LORA_A:
            expected = (rank, ref.shape[1])
        elif factor == LORA_B:
            expected = (ref.shape[0], rank)
        else:
            expected = ref.shape
        if value.shape != tuple(expected):
            return f"{key} has shape {value.shape}, expected {tuple(expected)}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key} has dtype {value.dtype}, expected a float dtype"
        if not np.all(np.isfinite(value)):
            return f"{key} has non-finite values"
    return None


def update_norm(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """||reply - sent||_F over every array, the sent factors cut to the reply's (pruned) rank."""
    total = 0.0
    for key, value in reply.items():
        ref = sent[key][tuple(slice(0, n) for n in value.shape)]
        total += float(np.sum((value.astype(np.float64) - ref) ** 2))
    return float(np.sqrt(total))


@dataclass(frozen=True)
class Decoded:
    """A reply's outcome: the update, or why it was rejected; and the array bytes it carried."""

    update: ClientUpdate | None
    problem: str | None
    bytes_up: int = 0


def decode_reply(
    reply: Message,
    client_id: int | None,
    sent: SentAdapter | None,
    allowed_ranks: set[int],
    max_update_norm: float,
) -> Decoded:
    """Check a training reply against what was sent (see the module); never raises."""
    try:
        try:
            record = reply.content[wire.METRICS]
            state = wire.from_record(reply.content[wire.ARRAYS])
            metrics = wire.TrainReply.from_record(record)
        except (KeyError, TypeError, ValueError) as err:
            return Decoded(None, f"missing or malformed {err}")
        received = wire.nbytes(state)
        if sent is None:
            return Decoded(None, "it was not sent anything this round", received)
        problem = None
        if metrics.rank not in allowed_ranks:
            problem = f"it claims rank {metrics.rank}, allowed {sorted(allowed_ranks)}"
        elif metrics.num_examples < 1 or not np.isfinite(metrics.train_loss):
            problem = f"num-examples {metrics.num_examples}, train-loss {metrics.train_loss}"
        else:
            problem = reply_problem(state, sent.expected, metrics.rank)
        if problem is None and max_update_norm > 0:
            norm = update_norm(state, sent.expected)
            if norm > max_update_norm:
                problem = f"update norm {norm:.4g} > max-update-norm {max_update_norm}"
        if problem is not None:
            return Decoded(None, problem, received)
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
        update = ClientUpdate(
            client_id, metrics.num_examples, metrics.rank, state, numbers, sent.scaling
        )
        return Decoded(update, None, received)
    except Exception as err:  # noqa: BLE001 - any malformed content is a rejection
        return Decoded(None, f"undecodable reply ({type(err).__name__}: {err})")


def accepted_update(
    reply: Message,
    client_id: int | None,
    sent: SentAdapter | None,
    allowed_ranks: set[int],
    settings: RunSettings,
    stats: RoundStats,
) -> ClientUpdate | None:
    """A reply as an update at the global scaling (``lora.rescale``: B times s_k / s_g, s_k the
    scaling it trained at, also after pruning), or None after logging why it was not valid;
    counts the bytes it carried and the rejection."""
    node_id = reply.metadata.src_node_id
    if reply.has_error():
        log(WARNING, "client %s (node %d) failed: %s", client_id, node_id, reply.error.reason)
        return None
    decoded = decode_reply(reply, client_id, sent, allowed_ranks, settings.max_update_norm)
    stats.bytes_up += decoded.bytes_up
    if decoded.update is None:
        stats.rejected += 1
        problem = decoded.problem
        log(WARNING, "rejected reply of client %s (node %d): %s", client_id, node_id, problem)
        return None
    if not settings.lora.rescale:
        return decoded.update
    state = rescale_state(decoded.update.state, sent.scaling / sent.source_scaling)
    return replace(decoded.update, state=state, scaling=sent.source_scaling)


def contributor_groups(
    updates: list[ClientUpdate], global_lora: LoraPairs
) -> list[tuple[list[ClientUpdate], LoraPairs]]:
    """The modules grouped by the updates that returned them: per group, those updates
    restricted to its modules and its global modules (modules nobody returned are left out)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for module in global_lora:
        contributors = tuple(i for i, u in enumerate(updates) if module in u.lora)
        groups.setdefault(contributors, []).append(module)
    return [
        (
            [updates[i].restricted(modules) for i in contributors],
            {m: global_lora[m] for m in modules},
        )
        for contributors, modules in groups.items()
        if contributors
    ]


def with_global_factors(
    update: ClientUpdate, global_state: State, factors: tuple[str, ...]
) -> ClientUpdate:
    """``update`` completed with the LoRA factors its client keeps to itself (``factors``, never
    sent or returned: FedSA-LoRA's B) at their global values cut to its rank, for the modules it
    returned: the server's view of a personal factor is the global one, so a method's rule sees
    factor pairs."""
    if not factors:
        return update
    returned = {adapter_state.module_of(k) for k in update.state if adapter_state.factor_of(k)}
    global_cut = adapter_state.truncate_state(global_state, update.rank)
    kept = {
        k: v
        for k, v in global_cut.items()
        if adapter_state.factor_of(k) in factors and adapter_state.module_of(k) in returned
    }
    return replace(update, state=update.state | kept)


def enough_replies(server_round: int, valid: int, min_train_replies: int) -> bool:
    """Whether a round got ``min-train-replies`` valid replies (logged when it did not)."""
    if valid < min_train_replies:
        log(WARNING, f"aggregate_train: round {server_round} got {valid} valid replies, "
            f"min-train-replies is {min_train_replies}")  # fmt: skip
    return valid >= min_train_replies


def train_metrics(updates: list[ClientUpdate]) -> MetricRecord:
    """The round's training metrics: the train loss averaged with p_k = n_k / sum(n), and the
    examples trained on."""
    weights = normalize_weights([u.num_examples for u in updates])
    loss = sum(w * u.metrics[wire.TRAIN_LOSS] for w, u in zip(weights, updates, strict=True))
    examples = sum(u.num_examples for u in updates)
    return MetricRecord({wire.TRAIN_LOSS: float(loss), wire.NUM_EXAMPLES: examples})
