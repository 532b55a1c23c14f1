"""Fuzzing (hypothesis) of what the server reads from outside: client replies, budget replies,
profile files. No input may raise past the server's validation; bad input is rejected."""

from __future__ import annotations

import numpy as np
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hetfed import wire
from hetfed.config import RunSettings
from hetfed.errors import ConfigError
from hetfed.profiles import DeviceProfiles, parse_profiles
from strategies.hetlora import HetLoRA, HetLoRAOptions
from tests.harness import PROFILES, InProcessGrid, _reply, global_state

SENT_KEYS = sorted(global_state(np.random.default_rng(0)))
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int8, np.uint8, np.bool_]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
)
arrays = st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=12))
)
array_records = st.dictionaries(
    st.one_of(st.sampled_from(SENT_KEYS), st.text(min_size=1, max_size=20)), arrays, max_size=8
)
metric_records = st.dictionaries(
    st.one_of(
        st.sampled_from([wire.NUM_EXAMPLES, wire.RANK, wire.TRAIN_LOSS]),
        st.text(min_size=1, max_size=10),
    ),
    st.one_of(scalars, st.lists(st.floats(allow_nan=True), max_size=3)),
    max_size=5,
)


def _valid_reply(msg: Message) -> RecordDict:
    sent = wire.from_record(msg.content[wire.ARRAYS])
    rank = int(msg.content[wire.CONFIG][wire.RANK])
    metrics = MetricRecord({wire.NUM_EXAMPLES: 5, wire.RANK: rank, wire.TRAIN_LOSS: 0.5})
    return RecordDict({wire.ARRAYS: wire.to_record(sent), wire.METRICS: metrics})


@st.composite
def replies(draw):
    """Reply contents: a valid reply with some keys replaced, or fully random records."""
    kind = draw(st.sampled_from(["mutated", "random", "missing"]))
    content = {}
    if kind != "missing":
        content[wire.ARRAYS] = {k: v for k, v in draw(array_records).items()}
        content[wire.METRICS] = draw(metric_records)
    return kind, content


@FUZZ
@given(contents=st.lists(replies(), min_size=1, max_size=3))
def test_no_reply_content_crashes_aggregation_or_corrupts_the_global(contents):
    strategy = HetLoRA(RunSettings(min_train_nodes=1, min_available_nodes=3), PROFILES, None)
    strategy.options = HetLoRAOptions()
    state = global_state(np.random.default_rng(1))
    messages = list(
        strategy.configure_train(1, wire.to_record(state), ConfigRecord(), InProcessGrid())
    )
    built = []
    for msg, (kind, content) in zip(messages, contents, strict=False):
        if kind == "mutated":  # a valid reply whose listed entries are replaced
            reply = _valid_reply(msg)
            for key, value in content[wire.ARRAYS].items():
                reply[wire.ARRAYS][key] = Array(np.asarray(value, order="C"))
            for key, value in content[wire.METRICS].items():
                reply[wire.METRICS][key] = value
        else:
            reply = RecordDict()
            if content:
                reply[wire.ARRAYS] = ArrayRecord(
                    {k: Array(np.asarray(v, order="C")) for k, v in content[wire.ARRAYS].items()}
                )
                reply[wire.METRICS] = MetricRecord(content[wire.METRICS])
        built.append(_reply(msg, reply))
    new_arrays, _ = strategy.aggregate_train(1, built)  # must not raise
    stats = strategy.stats[1]
    assert stats.replied + stats.rejected == len(built)
    if new_arrays is None:
        assert stats.replied == 0
    else:  # whatever was accepted: the same keys and shapes, finite values
        new = wire.from_record(new_arrays)
        assert new.keys() == state.keys()
        for key, value in new.items():
            assert value.shape == state[key].shape and np.all(np.isfinite(value))


budget_values = st.one_of(scalars, st.text(max_size=8), st.booleans(), st.sampled_from(["s", "l"]))


@FUZZ
@given(
    budgets=st.lists(
        st.dictionaries(
            st.sampled_from([wire.TIER, wire.RANK, wire.CLIENT_ID, "other"]),
            budget_values,
            max_size=4,
        ),
        min_size=3,
        max_size=3,
    )
)
def test_no_budget_reply_crashes_registration(budgets):
    class FuzzGrid(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            return [
                _reply(m, RecordDict({wire.BUDGET: ConfigRecord(b)}))
                for m, b in zip(messages, budgets, strict=True)
            ]

    strategy = HetLoRA(RunSettings(min_train_nodes=1, min_available_nodes=3), PROFILES, None)
    available = strategy.register_clients(FuzzGrid())
    for client in available:
        budget = strategy.budgets[client]
        assert budget.tier in PROFILES.tiers and 1 <= budget.rank <= PROFILES.tier(budget.tier).rank


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), scalars, st.text(max_size=6)),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(["tiers", "assignment", "rank", "layers", "ratios", "s", "m"]),
                st.text(max_size=6),
            ),
            children,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@FUZZ
@given(doc=yaml_values)
def test_profile_parser_gives_a_profile_or_a_config_error(doc):
    _parse_or_config_error(yaml.safe_dump(doc))


@FUZZ
@given(text=st.text(max_size=200))
def test_profile_parser_on_arbitrary_text(text):
    _parse_or_config_error(text)


def _parse_or_config_error(text: str) -> None:
    try:
        profiles = parse_profiles(text, source="fuzz.yaml")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yaml: key ")
        return
    assert isinstance(profiles, DeviceProfiles) and profiles.tiers
    for tier in profiles.tiers.values():
        assert isinstance(tier.rank, int) and tier.rank >= 1


@FUZZ
@given(state=st.dictionaries(st.text(min_size=1, max_size=20), arrays, max_size=6))
def test_wire_records_round_trip_any_arrays(state):
    back = wire.from_record(wire.to_record(state))
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)
