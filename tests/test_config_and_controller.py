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
