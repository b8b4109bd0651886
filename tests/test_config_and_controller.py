"""Config presets and overrides; the Lagrangian controller of paper 003 A.5."""

import pytest

from progvae.config import Config, load_config, preset_names
from progvae.controllers import LagrangianController
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


def _drive(controller, distortion, steps=200):
    for _ in range(steps):
        controller.update(rate=1.0, distortion=distortion)
    return controller.multiplier


def test_lagrangian_moves_the_multiplier_toward_meeting_the_target():
    above = LagrangianController(target=0.01, init=0.5, lr=1e-3)
    below = LagrangianController(target=0.01, init=0.5, lr=1e-3)
    assert _drive(above, distortion=0.02) > 0.5 + 0.1   # too much distortion: weigh D more
    assert _drive(below, distortion=0.005) < 0.5 - 0.1  # target met: weigh rate more


def test_lagrangian_stays_in_bounds_and_starts_at_the_top():
    controller = LagrangianController(target=0.01)
    assert controller.multiplier == pytest.approx(0.9999)
    assert _drive(controller, distortion=1.0, steps=50) == pytest.approx(0.9999)
    controller = LagrangianController(target=0.01, lr=0.05)
    assert _drive(controller, distortion=0.0, steps=500) == pytest.approx(1e-4)
    assert controller.at_bound()


def test_lagrangian_loss_weights_rate_and_distortion_without_gradient_to_the_multiplier():
    import torch

    controller = LagrangianController(target=0.01, init=0.75)
    rate = torch.tensor(2.0, requires_grad=True)
    distortion = torch.tensor(0.5, requires_grad=True)
    loss = controller.loss(rate, distortion)
    loss.backward()
    assert loss.item() == pytest.approx(0.25 * 2.0 + 0.75 * 0.5)
    assert rate.grad.item() == pytest.approx(0.25) and distortion.grad.item() == pytest.approx(0.75)
    assert controller.lam.grad is None


def test_lagrangian_state_round_trips():
    first = LagrangianController(target=0.01, init=0.5, lr=1e-2)
    _drive(first, distortion=0.03, steps=10)
    second = LagrangianController(target=0.01, init=0.9, lr=1e-2)
    second.load_state_dict(first.state_dict())
    _drive(first, distortion=0.002, steps=10)
    _drive(second, distortion=0.002, steps=10)
    assert first.multiplier == second.multiplier
