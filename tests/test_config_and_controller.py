"""Config presets and overrides (the controllers are tested in test_controllers.py)."""

# ---------------------------------------------------------------- properties (hypothesis)
from dataclasses import fields  # noqa: E402

import pytest
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from progvae.core.config import Config, load_config, preset_names
from progvae.core.errors import UserError


def test_presets_exist_and_carry_the_paper_hyperparameters():
    assert {"svhn", "celeba64", "lsun64", "digits", "tiny"} <= set(preset_names())
    svhn = load_config("svhn")
    assert (svhn.width, svhn.zdim, svhn.lr, svhn.ema_rate) == (384, 16, 2e-4, 0.9999)
    assert (svhn.adam_beta1, svhn.adam_beta2, svhn.skip_threshold) == (0.9, 0.9, 500.0)
    assert svhn.dec_blocks == "1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21"
    assert load_config("celeba64").batch_size == 6


def test_overrides_apply_and_are_type_checked():
    config = load_config("tiny", {"steps": 7, "lr": 1, "distortion_target": 0.01})
    assert (config.steps, config.lr, config.distortion_target) == (7, 1.0, 0.01)
    with pytest.raises(UserError, match="'steps'.*integer"):
        load_config("tiny", {"steps": "many"})
    with pytest.raises(UserError, match="Unknown config field 'widht'.*width"):
        load_config("tiny", {"widht": 3})
    with pytest.raises(UserError, match="Unknown config preset 'nope'"):
        load_config("nope")


def test_config_round_trips_through_a_dict():
    config = load_config("digits")
    assert Config.from_dict(config.to_dict()) == config




FIELD_TYPES = {f.name: f.type for f in fields(Config)}
META = {f.name: f.metadata for f in fields(Config)}


def allowed_values(name: str):
    """Values of the field's type inside its declared range or choices."""
    meta, kind = META[name], FIELD_TYPES[name]
    if meta["choices"]:
        return st.sampled_from(meta["choices"])
    if kind == "str":
        return st.text(max_size=20)
    if kind == "bool":
        return st.booleans()
    low = meta["minimum"] if meta["minimum"] is not None else meta["above"]
    high = meta["maximum"] if meta["maximum"] is not None else meta["below"]
    if kind == "int":
        return st.integers(-10**9 if low is None else int(low), 10**9 if high is None else int(high))
    return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False,
                     exclude_min=meta["above"] is not None, exclude_max=meta["below"] is not None)


BOUNDED = sorted(name for name, meta in META.items()
                 if any(meta[key] is not None for key in ("minimum", "above", "maximum", "below")))
WRONG = {"int": st.one_of(st.text(min_size=1).filter(lambda t: t.lower() not in ("true", "false")),
                          st.floats(allow_nan=False).filter(lambda v: not v.is_integer())),
         "float": st.one_of(st.text(min_size=1), st.booleans(), st.none()),
         "bool": st.one_of(st.text(min_size=1).filter(lambda t: t.lower() not in ("true", "false")),
                           st.integers(), st.none()),
         "str": st.one_of(st.none(), st.lists(st.integers(), max_size=2))}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(FIELD_TYPES)), st.data())
def test_any_allowed_value_is_taken_as_given(name, data):
    value = data.draw(allowed_values(name))
    config = load_config("digits", {name: value})
    assert getattr(config, name) == value
    assert Config.from_dict(config.to_dict()) == config


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(FIELD_TYPES)), st.data())
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(name, data):
    value = data.draw(WRONG[FIELD_TYPES[name]])
    with pytest.raises(UserError, match=f"'{name}'"):
        load_config("digits", {name: value})


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(BOUNDED), st.floats(min_value=1e-6, max_value=1e6), st.booleans())
def test_a_value_outside_a_fields_range_is_refused_naming_it(name, distance, at_the_low_end):
    meta = META[name]
    low = meta["minimum"] if meta["minimum"] is not None else meta["above"]
    high = meta["maximum"] if meta["maximum"] is not None else meta["below"]
    edge, sign = (low, -1) if at_the_low_end else (high, 1)
    if edge is None:
        edge, sign = (high, 1) if low is None else (low, -1)
    value = edge + sign * distance
    if FIELD_TYPES[name] == "int":
        value = int(edge) + sign * max(1, int(distance))
    with pytest.raises(UserError, match=f"Config field '{name}'.*must be"):
        load_config("digits", {name: value})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(UserError, match="finite"):
        load_config("digits", {"distortion_target": value})


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=30).filter(lambda name: name not in FIELD_TYPES))
def test_an_unknown_field_is_refused_naming_it(name):
    with pytest.raises(UserError, match="Unknown config field"):
        load_config("digits", {name: 1})


def test_learning_rate_warms_up_then_drops_to_a_tenth_for_the_last_lr_decay_steps():
    from progvae.training.updates import learning_rate

    config = Config(lr=1e-3, warmup_steps=10, steps=100, lr_decay_steps=20)
    rates = [learning_rate(config, step) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[79] == pytest.approx(1e-3)
    assert rates[80] == pytest.approx(1e-4) and rates[99] == pytest.approx(1e-4)
    no_decay = Config(lr=1e-3, steps=100)
    assert {learning_rate(no_decay, step) for step in range(100)} == {1e-3}
