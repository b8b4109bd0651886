"""Config presets and overrides (the controllers are tested in test_controllers.py)."""

import pytest

from progvae.config import Config, load_config, preset_names
from progvae.errors import UserError


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


# ---------------------------------------------------------------- properties (hypothesis)
from dataclasses import fields  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FIELD_TYPES = {f.name: f.type for f in fields(Config)}
VALUES = {"int": st.integers(-10**9, 10**9), "float": st.floats(allow_nan=False),
          "str": st.text(max_size=20), "bool": st.booleans()}
WRONG = {"int": st.one_of(st.text(min_size=1).filter(lambda t: t.lower() not in ("true", "false")),
                          st.floats(allow_nan=False).filter(lambda v: not v.is_integer())),
         "float": st.one_of(st.text(min_size=1), st.booleans(), st.none()),
         "bool": st.one_of(st.text(min_size=1).filter(lambda t: t.lower() not in ("true", "false")),
                           st.integers(), st.none()),
         "str": st.one_of(st.none(), st.lists(st.integers(), max_size=2))}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(FIELD_TYPES)), st.data())
def test_any_value_of_a_fields_type_is_taken_as_given(name, data):
    value = data.draw(VALUES[FIELD_TYPES[name]])
    config = load_config("digits", {name: value})
    assert getattr(config, name) == value
    assert Config.from_dict(config.to_dict()) == config


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(FIELD_TYPES)), st.data())
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(name, data):
    value = data.draw(WRONG[FIELD_TYPES[name]])
    with pytest.raises(UserError, match=f"'{name}'"):
        load_config("digits", {name: value})


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=30).filter(lambda name: name not in FIELD_TYPES))
def test_an_unknown_field_is_refused_naming_it(name):
    with pytest.raises(UserError, match="Unknown config field"):
        load_config("digits", {name: 1})
