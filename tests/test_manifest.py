"""The run manifest's settings are derived from the config fields marked ``shared``, and nothing on the wire moved.

Proves: the manifest (and so its hash, the run's averaging namespace) of two fixed configs is byte for byte what it
was when the settings were still declared four times over; the derived TrainSettings/RoundSettings schemas are as
strict as the hand-written ones were (required fields, no extras, no coercion, bounds, Literal choices, finite
floats); resolved settings (warmup_steps, outer_lr) travel resolved; conflicts name ``section.key: run X, yours Y``
only for what the user set (an explicit --outer-optimizer pins outer_lr too); adopting a run's manifest reproduces
it; and a new shared field joins the schema with no other change.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from photon_p2p.config import ModelConfig, RoundConfig, RunConfig, Shared, SwarmConfig, TrainConfig, opt
from photon_p2p.swarm.manifest import adopt_manifest, build_manifest, settings_conflicts
from photon_p2p.swarm.records import Manifest, RoundSettings, TrainSettings, record_hash, settings_schema


def micro_config(**kwargs) -> RunConfig:
    return RunConfig(model=ModelConfig(preset="micro"), swarm=SwarmConfig(run_id="pin"), **kwargs)


DEFAULTS = micro_config(train=TrainConfig(max_steps=1000), round=RoundConfig(local_steps=5))
CHANGED = micro_config(
    train=TrainConfig(max_steps=500, lr=3e-3, warmup_steps=7, grad_clip=0.5, batch_size=4),
    round=RoundConfig(
        local_steps=3,
        round_seconds=2.5,
        outer_optimizer="nesterov",
        outer_momentum=0.8,
        compression="blockwise8bit",
        reset_inner_optimizer=True,
    ),
)


@pytest.fixture(scope="module")
def make_manifest():
    from photon_p2p.data import load_tokenizer
    from photon_p2p.model import build_model_args, pad_vocab

    tokenizer = load_tokenizer("byte")
    args = build_model_args("micro", vocab_size=pad_vocab(tokenizer.vocab_size))
    return lambda cfg: build_manifest(cfg, tokenizer, args)


def pinned_hash(m: Manifest) -> str:
    # the software version changes with every release and the zlib stream with the zlib build: pin both, so the
    # hash covers exactly the settings (model shape, tokenizer fingerprint, train and round tables)
    return record_hash(Manifest.model_validate({**m.model_dump(), "software": "pinned", "tokenizer_json": b"pinned"}))


@pytest.mark.parametrize(
    "cfg, expected",
    [
        # computed before the settings were derived from config.py's ``shared`` fields (hand-written TrainSettings,
        # RoundSettings, _TRAIN_KEYS, _ROUND_KEYS): a different hash here means peers of this version and of the last
        # one can no longer average together. Change it only on purpose, with PROTOCOL_VERSION (changed for protocol 2:
        # robust_aggregation and robust_clip joined the round table)
        (DEFAULTS, "6273a0297d95297d7a1270b070f805324a306ccfe9867057e9b5fcc24d70f73f"),
        (CHANGED, "3b62d781ee2a40344984edb8bfc961dc171ad5f5efd29d01ce5f926962c198ee"),
    ],
    ids=["defaults", "changed"],
)
def test_manifest_hash_is_unchanged(make_manifest, cfg, expected):
    assert pinned_hash(make_manifest(cfg)) == expected


def test_settings_travel_resolved(make_manifest):
    m = make_manifest(CHANGED)
    assert m.train.model_dump() == {
        "max_steps": 500,
        "batch_size": 4,
        "lr": 0.003,
        "warmup_steps": 7,
        "alpha_f": 0.1,
        "weight_decay": 0.1,
        "grad_clip": 0.5,
    }
    assert m.round.model_dump() == {
        "local_steps": 3,
        "round_seconds": 2.5,
        "reset_inner_optimizer": True,
        "outer_optimizer": "nesterov",
        "outer_lr": 0.7,
        "outer_momentum": 0.8,
        "compression": "blockwise8bit",
        "robust_aggregation": True,
        "robust_clip": 2.0,
    }
    defaults = make_manifest(DEFAULTS)
    assert (defaults.train.warmup_steps, defaults.round.outer_lr) == (100, 1.0)  # 10% of max_steps; fedavg's lr


GOOD_TRAIN = {
    "max_steps": 1000,
    "batch_size": 16,
    "lr": 0.001,
    "warmup_steps": 100,
    "alpha_f": 0.1,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
}
GOOD_ROUND = {
    "local_steps": 5,
    "round_seconds": None,
    "reset_inner_optimizer": False,
    "outer_optimizer": "fedavg",
    "outer_lr": 1.0,
    "outer_momentum": 0.9,
    "compression": "fp16",
    "robust_aggregation": True,
    "robust_clip": 2.0,
}


@pytest.mark.parametrize(
    "schema, good, change",
    [
        (TrainSettings, GOOD_TRAIN, {"extra": 1}),
        (TrainSettings, GOOD_TRAIN, {"max_steps": 0}),
        (TrainSettings, GOOD_TRAIN, {"warmup_steps": -1}),
        (TrainSettings, GOOD_TRAIN, {"warmup_steps": None}),  # resolved: never None in a manifest
        (TrainSettings, GOOD_TRAIN, {"batch_size": "16"}),  # no coercion
        (TrainSettings, GOOD_TRAIN, {"lr": float("nan")}),
        (RoundSettings, GOOD_ROUND, {"local_steps": 0}),
        (RoundSettings, GOOD_ROUND, {"outer_optimizer": "sgd"}),
        (RoundSettings, GOOD_ROUND, {"compression": "FP16"}),
        (RoundSettings, GOOD_ROUND, {"outer_lr": None}),
        (RoundSettings, GOOD_ROUND, {"reset_inner_optimizer": 1}),
        (RoundSettings, GOOD_ROUND, {"round_seconds": float("inf")}),
    ],
)
def test_settings_schemas_stay_strict(schema, good, change):
    schema.model_validate(good)
    with pytest.raises(ValidationError):
        schema.model_validate({**good, **change})
    missing = dict(good)
    missing.pop(next(iter(good)))
    with pytest.raises(ValidationError):
        schema.model_validate(missing)


def test_conflicts_name_only_what_the_user_set(make_manifest):
    run, mine = make_manifest(DEFAULTS), make_manifest(CHANGED)
    assert settings_conflicts(run, mine, set()) == []  # defaults are adopted, never refused
    assert settings_conflicts(run, mine, {"round.local_steps", "train.seed", "round.min_group_size"}) == [
        "round.local_steps: run 5, yours 3"
    ]
    assert settings_conflicts(run, mine, {"train.warmup_steps", "round.compression"}) == [
        "train.warmup_steps: run 100, yours 7",
        "round.compression: run 'fp16', yours 'blockwise8bit'",
    ]
    # asking for nesterov explicitly asks for its default outer lr as well
    assert settings_conflicts(run, mine, {"round.outer_optimizer"}) == [
        "round.outer_optimizer: run 'fedavg', yours 'nesterov'",
        "round.outer_lr: run 1.0, yours 0.7",
    ]


def test_adopting_a_run_reproduces_its_manifest(make_manifest):
    run = make_manifest(CHANGED)
    cfg, _, _ = adopt_manifest(micro_config(), run)
    assert (cfg.train.warmup_steps, cfg.round.outer_lr) == (7, 0.7)  # the run's numbers, not re-derived
    assert record_hash(make_manifest(cfg)) == record_hash(run)


def test_a_new_shared_field_is_one_line():
    @dataclass(kw_only=True)
    class Extended(RoundConfig):
        lookahead: int = opt(4, help="a future round setting", shared=Shared(ge=1))
        patience: float = opt(1.0, help="a future per-peer setting")

    schema = settings_schema(Extended, "ExtendedSettings", "test")
    assert list(schema.model_fields) == [*RoundSettings.model_fields, "lookahead"]
    assert schema(**Extended().shared_values()).lookahead == 4
    with pytest.raises(ValidationError):
        schema.model_validate({**GOOD_ROUND, "lookahead": 0})
