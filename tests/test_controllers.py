"""The constraint controllers (progvae/training/controllers.py): each moves its weight on the constrained
term the right way, keeps its bounds, resumes exactly, and reports a missed target."""

import copy
import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch

from progvae.core.config import Config, load_config
from progvae.core.errors import UserError
from progvae.stages.stage1 import train_stage1
from progvae.training.controllers import (CONTROLLERS, DCOController, GECOController,
                                          LagrangianController, build_controller,
                                          constraint_summary, constraint_warning)

TARGET = 0.01            # distortion target of the unit tests
RATE_TARGET = 0.1        # rate target of `rate`
TARGETED = ["lagrangian", "geco", "dco", "rate"]   # the controllers that move their multiplier


def make(name: str, **fields) -> object:
    values = {"controller": name, "distortion_target": TARGET, "rate_target": RATE_TARGET,
              "multiplier_lr": 1e-2, "geco_lr": 10.0, "dco_lr": 5e-2, **fields}
    return build_controller(dataclasses.replace(Config(), **values))


def weights(controller, rate: float = 0.2, distortion: float = TARGET) -> tuple[float, float]:
    """(d loss / d R, d loss / d D) at the given batch values: what the model is pushed by."""
    rate = torch.tensor(rate, requires_grad=True)
    distortion = torch.tensor(distortion, requires_grad=True)
    controller.loss(rate, distortion).backward()
    return rate.grad.item(), distortion.grad.item()


def weight_on_constrained(controller) -> float:
    """The weight on the constrained term relative to the other: D/R, or R/D for `rate`."""
    on_rate, on_distortion = weights(controller)
    return on_rate / on_distortion if controller.name == "rate" else on_distortion / on_rate


def drive(controller, factor: float, steps: int) -> None:
    """`steps` updates with the constrained quantity at `factor` times its target."""
    for _ in range(steps):
        if controller.name == "rate":
            controller.update(rate=factor * RATE_TARGET, distortion=0.05)
        else:
            controller.update(rate=0.2, distortion=factor * TARGET)


@pytest.mark.parametrize("name", TARGETED)
def test_the_weight_on_the_constrained_term_falls_below_the_target_and_rises_above(name):
    controller = make(name)
    drive(controller, factor=0.5, steps=300)       # target met: relax
    relaxed = weight_on_constrained(controller)
    drive(controller, factor=2.0, steps=300)       # target missed: push harder
    pushed = weight_on_constrained(controller)
    assert pushed > 2 * relaxed
    drive(controller, factor=0.5, steps=300)       # met again: relax again
    assert weight_on_constrained(controller) < pushed / 2


@pytest.mark.parametrize("name", TARGETED)
def test_an_unreachable_target_saturates_the_multiplier_at_its_bound(name):
    controller = make(name)
    drive(controller, factor=0.5, steps=100)
    drive(controller, factor=100.0, steps=2000)
    limit = {"lagrangian": 0.9999, "rate": 0.9999, "geco": 1e4, "dco": 1e3}[name]
    assert controller.multiplier == pytest.approx(limit)
    assert controller.at_bound() and controller.saturated()
    assert controller.saturated_fraction > 0.9


@pytest.mark.parametrize("name", ["lagrangian", "geco", "rate"])
def test_an_easy_target_stops_the_multiplier_at_its_lower_bound(name):
    controller = make(name)
    drive(controller, factor=0.0, steps=5000)
    assert controller.multiplier == pytest.approx(1e-4)
    assert controller.at_bound() and not controller.saturated()


def test_dco_starts_at_its_clip_and_has_no_lower_bound():
    controller = make("dco")
    assert controller.multiplier == pytest.approx(1e3) and controller.saturated()
    drive(controller, factor=0.0, steps=3000)
    assert 0 < controller.multiplier < 1e-3 and not controller.at_bound()


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_state_round_trips(name):
    first = make(name)
    drive(first, factor=3.0, steps=20)
    drive(first, factor=0.5, steps=7)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)                     # as the checkpoint stores it
    saved.seek(0)
    second = make(name)
    second.load_state_dict(torch.load(saved, weights_only=True))
    for controller in (first, second):
        drive(controller, factor=0.3, steps=10)
        drive(controller, factor=1.7, steps=10)
    assert first.multiplier == second.multiplier
    assert (first.updates, first.saturated_updates) == (second.updates, second.saturated_updates)
    assert weights(first) == weights(second)


def _tensor_to_list(value):
    return value.tolist()


def test_a_checkpoint_of_another_controller_is_refused():
    with pytest.raises(UserError, match="'lagrangian' controller.*--controller=lagrangian"):
        make("geco").load_state_dict(make("lagrangian").state_dict())


@pytest.mark.parametrize("name", ["hinge", "beta"])
def test_hinge_and_beta_never_change_their_weight(name):
    controller = make(name, hinge_weight=0.5, beta=0.3)
    before = (controller.multiplier, weights(controller, distortion=2 * TARGET),
              weights(controller, distortion=TARGET / 2))
    for factor in (100.0, 0.0, 1.0, 3.0):
        drive(controller, factor=factor, steps=50)
    after = (controller.multiplier, weights(controller, distortion=2 * TARGET),
             weights(controller, distortion=TARGET / 2))
    assert before == after
    assert controller.saturated_fraction == 0 and not controller.at_bound()


def test_hinge_pushes_on_distortion_only_above_its_target():
    controller = make("hinge", hinge_weight=0.5)
    on_rate, on_distortion = weights(controller, distortion=TARGET / 2)
    assert on_rate > 0 and on_distortion == 0
    on_rate, on_distortion = weights(controller, distortion=2 * TARGET)
    assert on_distortion / on_rate == pytest.approx(0.5 / TARGET)       # eq. 4: lam / c


def test_beta_weights_rate_by_beta():
    on_rate, on_distortion = weights(make("beta", beta=0.3))
    assert on_rate / on_distortion == pytest.approx(0.3)


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_the_loss_sends_no_gradient_into_the_multiplier_and_changes_no_state(name):
    controller = make(name)
    drive(controller, factor=2.0, steps=5)
    state = json.dumps(controller.state_dict(), default=_tensor_to_list)
    weights(controller)
    weights(controller)
    assert json.dumps(controller.state_dict(), default=_tensor_to_list) == state
    for value in vars(controller).values():
        if isinstance(value, torch.Tensor):
            assert value.grad is None


def test_lagrangian_loss_is_the_convex_combination_of_paper_003_eq_10():
    controller = LagrangianController(target=0.01, init=0.75)
    rate = torch.tensor(2.0, requires_grad=True)
    distortion = torch.tensor(0.5, requires_grad=True)
    loss = controller.loss(rate, distortion)
    loss.backward()
    assert loss.item() == pytest.approx(0.25 * 2.0 + 0.75 * 0.5)
    assert rate.grad.item() == pytest.approx(0.25) and distortion.grad.item() == pytest.approx(0.75)
    assert controller.multiplier_value.grad is None


def test_rate_controller_swaps_the_roles_of_rate_and_distortion():
    controller = make("rate")
    assert controller.multiplier == pytest.approx(1e-4)          # rate weighted 1e-4 at first
    controller = make("rate", multiplier_init=0.75)               # the initial weight on D
    assert weights(controller) == pytest.approx((0.25, 0.75))
    controller.update(rate=2 * RATE_TARGET, distortion=0.0)     # over the rate target
    assert controller.multiplier > 0.25
    assert weights(controller)[0] > 0.25


def test_geco_follows_algorithm_1():
    """Moving average of C = D - target started at the first batch, log lam moved by it, and
    the stop-gradient construction: the loss *value* uses C_ma, its *gradient* this batch."""
    controller = GECOController(target=0.01, lr=2.0, ema=0.9)
    assert controller.multiplier == 1.0                       # Algorithm 1 starts at lam = 1
    controller.update(rate=0.3, distortion=0.05)               # C_hat = 0.04 = C_ma
    assert controller.constraint_average == pytest.approx(0.04)
    assert math.log(controller.multiplier) == pytest.approx(2.0 * 0.04)   # above: lam grows
    lam = controller.multiplier

    rate = torch.tensor(0.3, requires_grad=True)
    distortion = torch.tensor(0.002, requires_grad=True)      # C_hat = -0.008
    loss = controller.loss(rate, distortion)
    loss.backward()
    average = 0.9 * 0.04 + 0.1 * -0.008                        # C_ma^t, includes this batch
    assert loss.item() == pytest.approx((0.3 + lam * average) / (1 + lam))
    assert distortion.grad.item() == pytest.approx(lam / (1 + lam))   # d C^t / d D = 1
    assert rate.grad.item() == pytest.approx(1 / (1 + lam))

    controller.update(rate=0.3, distortion=0.002)
    assert controller.constraint_average == pytest.approx(average)
    assert math.log(controller.multiplier) == pytest.approx(2.0 * (0.04 + average))
    for _ in range(100):
        controller.update(rate=0.3, distortion=0.002)          # below the target: lam shrinks
    assert controller.multiplier < 1.0


def test_dco_is_momentum_sgd_on_log_lam_along_the_normalised_constraint():
    controller = DCOController(target=0.01, lr=0.1, momentum=0.9)
    start = math.log(1e3)
    assert controller.multiplier == pytest.approx(1e3)        # starts at the clip
    controller.update(rate=0.3, distortion=0.02)               # D / c - 1 = +1: clipped
    assert controller.multiplier == pytest.approx(1e3)

    controller = DCOController(target=0.01, lr=0.1, momentum=0.9)
    # D / c - 1 = -0.5: torch's buffer starts at that value, undampened ...
    controller.update(rate=0.3, distortion=0.005)
    assert math.log(controller.multiplier) == pytest.approx(start - 0.1 * 0.5)
    controller.update(rate=0.3, distortion=0.005)              # ... then 0.9 b + 0.1 g
    assert math.log(controller.multiplier) == pytest.approx(start - 0.1 * (0.5 + 0.5))
    controller.update(rate=0.3, distortion=0.02)               # above, but momentum still falls
    assert math.log(controller.multiplier) == pytest.approx(start - 0.1 * (1.0 + 0.35))
    on_rate, on_distortion = weights(controller)
    assert on_distortion / on_rate == pytest.approx(controller.multiplier / 0.01)   # eq. 3


def test_build_controller_names_the_missing_flag():
    with pytest.raises(UserError, match="Unknown controller 'gecko'.*geco"):
        build_controller(Config(controller="gecko", distortion_target=0.1))
    for name in ("lagrangian", "geco", "dco", "hinge"):
        with pytest.raises(UserError, match="distortion target.*--distortion_target"):
            build_controller(Config(controller=name))
        with pytest.raises(UserError, match="distortion target"):
            build_controller(Config(controller=name, distortion_target=-0.5))
    with pytest.raises(UserError, match="rate target.*--rate_target"):
        build_controller(Config(controller="rate", distortion_target=0.01))
    assert build_controller(Config(controller="rate", rate_target=0.2)).target == 0.2
    assert build_controller(Config(controller="beta")).multiplier == 1.0   # no target needed
    with pytest.raises(UserError, match="--geco_ema=1.0 is out of range.*geco"):
        build_controller(Config(controller="geco", distortion_target=0.1, geco_ema=1.0))
    with pytest.raises(UserError, match="--dco_lr=0.0"):
        build_controller(Config(controller="dco", distortion_target=0.1, dco_lr=0.0))


def test_constraint_summary_and_warning():
    controller = make("lagrangian")
    drive(controller, factor=0.5, steps=50)                   # leaves the top bound at once
    summary = constraint_summary(controller, rate=0.2, distortion=1.04 * TARGET, tolerance=0.05)
    assert summary["constraint_met"] is True and summary["saturated_fraction"] == 0
    assert summary["relative_error"] == pytest.approx(0.04)
    missed = constraint_summary(controller, rate=0.2, distortion=1.06 * TARGET, tolerance=0.05)
    assert missed["constraint_met"] is False
    warning = constraint_warning({**missed, "rate": 0.2, "mse": 1.06 * TARGET,
                                  "multiplier": controller.multiplier})
    assert "distortion target 0.01 MSE/dim" in warning and "0.0106" in warning

    saturated = make("lagrangian")
    drive(saturated, factor=0.5, steps=10)
    drive(saturated, factor=10.0, steps=100)                  # at its bound for most updates
    summary = constraint_summary(saturated, rate=0.2, distortion=TARGET, tolerance=0.05)
    assert summary["constraint_met"] is False and summary["multiplier_at_bound"]
    assert constraint_summary(make("beta"), 0.2, 0.3, 0.05)["constraint_met"] is None


# ---------------------------------------------------------------------------------------------
# behaviour on digits
TINY = {"width": 8, "zdim": 4, "enc_blocks": "16d2,8d2,4d4,1x1",
        "dec_blocks": "1x1,4m1,8m4,16m8", "log_every": 10, "checkpoint_every": 0, "n_grid": 4,
        "num_threads": 1}


@pytest.mark.parametrize("name", ["lagrangian", "geco", "dco"])
def test_an_unreachable_target_ends_unmet_at_the_bound_with_a_warning(name, tmp_path, capsys):
    config = load_config("digits", {**TINY, "controller": name, "distortion_target": 1e-6,
                                    "steps": 80})
    summary = train_stage1(config, tmp_path / name, quiet=True)
    assert summary["constraint_met"] is False
    assert summary["multiplier_at_bound"] and summary["saturated_fraction"] > 0.5
    written = json.loads((tmp_path / name / "summary.json").read_text())
    assert written["constraint_met"] is False
    warning = capsys.readouterr().err
    assert "distortion target 1e-06 MSE/dim was not met" in warning
    assert f"{summary['mse']:.5g}" in warning


@pytest.mark.parametrize("name, fields, constrained", [
    ("hinge", {"distortion_target": 0.05, "hinge_weight": 2.0}, "distortion"),
    ("beta", {"beta": 0.5}, None),
    ("rate", {"rate_target": 1e-5}, "rate")])
def test_the_other_controllers_train_end_to_end_and_report_their_constraint(name, fields,
                                                                            constrained,
                                                                            tmp_path):
    """hinge, beta and rate through a whole (short) stage-one run: the summary names the
    controller and what it constrains, the fixed weights stay put, and the logged multiplier
    is the controller's."""
    config = load_config("digits", {**TINY, "controller": name, "steps": 20, **fields})
    summary = train_stage1(config, tmp_path / name, quiet=True)
    assert summary["controller"] == name and summary["constrained"] == constrained
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text()
             .splitlines()]
    if name == "hinge":
        assert all(line["multiplier"] == 2.0 for line in lines)
        assert summary["target"] == 0.05
    elif name == "beta":
        assert all(line["multiplier"] == 0.5 for line in lines)
        assert summary["constraint_met"] is None and summary["target"] is None
    else:
        assert summary["target"] == 1e-5
        assert summary["relative_error"] == pytest.approx(summary["rate"] / 1e-5 - 1)
        # eta starts at 1 - multiplier_init; a rate far over its target raises it
        assert lines[-1]["multiplier"] > 100 * (1 - config.multiplier_init)


def test_continuing_a_run_with_another_controller_is_refused_before_any_write(tmp_path):
    out = tmp_path / "run"
    config = load_config("digits", {**TINY, "distortion_target": 0.05, "steps": 2})
    train_stage1(config, out, quiet=True)
    before = {path.name: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(UserError, match="--controller=lagrangian"):
        train_stage1(dataclasses.replace(config, controller="dco"), out, quiet=True)
    assert {path.name: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lagrangian", "geco", "dco"])
def test_a_reachable_target_is_met_within_five_percent_on_digits(name, tmp_path):
    """The digits preset for 1200 steps (about 2 minutes on 2 cores) at the demo's target."""
    config = load_config("digits", {"controller": name, "distortion_target": 0.02,
                                    "steps": 1200})
    summary = train_stage1(config, tmp_path / name, quiet=True)
    assert abs(summary["relative_error"]) <= 0.05, summary
    assert summary["constraint_met"] is True


# ---------------------------------------------------------------------------------------------
# bookkeeping the summaries and sweeps rely on
def test_each_controller_names_the_config_field_its_target_comes_from():
    from progvae.training.controllers import TARGET_FIELDS

    assert TARGET_FIELDS == {"lagrangian": "distortion_target", "geco": "distortion_target",
                             "dco": "distortion_target", "hinge": "distortion_target",
                             "beta": "beta", "rate": "rate_target"}
    for name, field in TARGET_FIELDS.items():
        controller = make(name, **{field: 0.03})
        assert (controller.target if name != "beta" else controller.multiplier) == 0.03


@pytest.mark.parametrize("name", TARGETED)
def test_updates_and_saturated_updates_are_counted_exactly(name):
    controller = make(name)
    assert controller.saturated_fraction == 0.0            # no update yet: nothing saturated
    drive(controller, factor=100.0, steps=400)             # far above: pushed to its limit
    saturated = controller.saturated_updates
    assert controller.updates == 400 and 0 < saturated <= 400
    drive(controller, factor=1e-3, steps=100)              # far below: off the limit again
    assert controller.updates == 500
    assert controller.saturated_fraction == controller.saturated_updates / 500
    state = controller.state_dict()
    assert (state["name"], state["updates"]) == (name, 500)
    assert state["saturated_updates"] == controller.saturated_updates
    assert set(controller.extra_state()) <= set(state)    # the controller's own state too


def test_a_controller_state_without_counters_resumes_them_at_zero():
    """Checkpoints of earlier versions hold no update counters: they resume at zero."""
    controller = make("lagrangian")
    drive(controller, factor=3.0, steps=5)
    state = controller.state_dict()
    del state["updates"], state["saturated_updates"]
    fresh = make("lagrangian")
    fresh.load_state_dict(state)
    assert (fresh.updates, fresh.saturated_updates) == (0, 0)
    assert fresh.multiplier == controller.multiplier


def test_controller_states_saved_by_earlier_versions_resume():
    """Earlier versions stepped the multiplier with torch.optim.Adam (lagrangian, rate) and SGD
    (dco) and saved their state dicts; those checkpoints resume with the same moments."""
    lagrangian = make("lagrangian")
    lagrangian.load_state_dict({
        "name": "lagrangian", "updates": 5, "saturated_updates": 2, "lam": 0.75,
        "tracked": 0.012, "optimizer": {"state": {0: {   # lam was a float64 parameter
            "step": torch.tensor(5.0), "exp_avg": torch.tensor(-0.002, dtype=torch.float64),
            "exp_avg_sq": torch.tensor(4e-6, dtype=torch.float64)}},
                                        "param_groups": [{"params": [0]}]}})
    assert (lagrangian.multiplier, lagrangian.updates) == (0.75, 5)
    assert float(lagrangian.second_moment) == 4e-6 and float(lagrangian.adam_steps) == 5.0
    assert lagrangian.state_dict()["tracked"] == 0.012
    dco = make("dco")
    dco.load_state_dict({"name": "dco", "log_lam": 2.0, "optimizer": {
        "state": {0: {"momentum_buffer": torch.tensor(0.25, dtype=torch.float64)}},
        "param_groups": [{"params": [0]}]}})
    assert float(dco.log_multiplier) == 2.0 and dco.state_dict()["momentum_buffer"] == 0.25
    fresh = make("dco")
    fresh.load_state_dict({"name": "dco", "log_lam": 2.0,
                           "optimizer": {"state": {}, "param_groups": [{"params": [0]}]}})
    assert fresh.state_dict()["momentum_buffer"] is None     # no update yet: starts afresh
    # The rate scheme was Adam-stepped, then PI control of log eta (its integral log eta):
    # both resume at their eta, and an update on the target leaves it there.
    for earlier in ({"adam": {"second_moment": 1e-4, "steps": 9.0}},
                    {"integral": math.log(0.25)}):
        rate = make("rate")
        rate.load_state_dict({"name": "rate", "updates": 9, "lam": 0.25, "tracked": RATE_TARGET,
                              **earlier})
        assert rate.multiplier == 0.25 and rate.updates == 9
        assert rate.state_dict()["tracked"] == RATE_TARGET
        rate.update(rate=RATE_TARGET, distortion=0.03)
        assert rate.multiplier == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# exact objectives, settings ranges and summaries (from the mutation pass)
def test_each_fixed_or_normalised_objective_has_its_papers_value():
    rate, distortion = torch.tensor(0.3), torch.tensor(0.05)       # D = 5 c for c = 0.01
    dco = make("dco", dco_max=4.0)                                  # lam = 4 at the start
    assert dco.loss(rate, distortion).item() == pytest.approx((0.3 + 4 * (5 - 1)) / (1 + 400))
    hinge = make("hinge", hinge_weight=2.0)
    assert hinge.loss(rate, distortion).item() == pytest.approx((0.3 + 2 * 4) / (1 + 200))
    assert hinge.loss(rate, torch.tensor(0.005)).item() == pytest.approx(0.3 / 201)
    beta = make("beta", beta=3.0)
    assert beta.loss(rate, distortion).item() == pytest.approx((0.05 + 3 * 0.3) / 4)
    geco = make("geco", geco_init=2.0)
    on_rate, on_distortion = weights(geco, rate=0.3, distortion=0.05)
    assert on_distortion / on_rate == pytest.approx(2.0)


@pytest.mark.parametrize("fields, allowed", [
    ({"controller": "geco", "geco_min": 0.5, "geco_init": 0.5}, True),
    ({"controller": "geco", "geco_init": 1e4, "geco_max": 1e4}, True),
    ({"controller": "geco", "geco_min": 0.0}, False),
    ({"controller": "geco", "geco_lr": 0.0}, False),
    ({"controller": "geco", "geco_ema": 0.0}, True),
    ({"controller": "geco", "geco_ema": 1.0}, False),
    ({"controller": "dco", "dco_momentum": 0.0}, True),
    ({"controller": "dco", "dco_momentum": 1.0}, False),
    ({"controller": "dco", "dco_max": 0.5}, True),
    ({"controller": "dco", "dco_max": 0.0}, False),
    ({"controller": "dco", "dco_lr": 0.0}, False),
    ({"controller": "hinge", "hinge_weight": 0.0}, False),
    ({"controller": "beta", "beta": 0.0}, True),
    ({"controller": "beta", "beta": -0.1}, False)])
def test_each_controller_checks_its_settings_at_their_edges(fields, allowed):
    config = dataclasses.replace(Config(), distortion_target=0.01, **fields)
    if allowed:
        assert build_controller(config).name == fields["controller"]
    else:
        with pytest.raises(UserError, match="out of range|must be"):
            build_controller(config)


def test_a_saved_state_does_not_change_when_training_goes_on():
    for name in ("dco", "lagrangian"):
        controller = make(name)
        drive(controller, factor=3.0, steps=5)
        saved = controller.state_dict()
        frozen = copy.deepcopy(saved)
        drive(controller, factor=0.2, steps=5)
        assert str(saved) == str(frozen), name


def test_the_run_directory_remembers_its_controller(tmp_path):
    from progvae.training.controllers import check_same_controller

    config = dataclasses.replace(Config(), controller="geco")
    check_same_controller(tmp_path / "new", config)                # nothing there yet
    (tmp_path / "config.json").write_text(json.dumps({"controller": "dco"}))
    with pytest.raises(UserError, match="--controller=dco to continue"):
        check_same_controller(tmp_path, config)
    check_same_controller(tmp_path, dataclasses.replace(config, controller="dco"))


def test_the_constraint_is_met_up_to_its_tolerance_and_half_the_updates_saturated():
    controller = make("lagrangian")
    edge = TARGET * 1.05
    assert constraint_summary(controller, 0.2, edge, 0.05)["constraint_met"] is True
    assert constraint_summary(controller, 0.2, edge * 1.001, 0.05)["constraint_met"] is False
    controller.updates, controller.saturated_updates = 10, 5      # exactly half: still met
    summary = constraint_summary(controller, 0.2, TARGET, 0.05)
    assert summary["constraint_met"] is True and summary["saturated_fraction"] == 0.5
    controller.updates, controller.saturated_updates = 3, 1
    assert constraint_summary(controller, 0.2, TARGET, 0.05)["saturated_fraction"] == 0.3333
    rate = make("rate")
    summary = constraint_summary(rate, RATE_TARGET * 1.2, 0.5, 0.05)
    assert summary["constrained"] == "rate"
    assert summary["relative_error"] == pytest.approx(0.2) and summary["constraint_met"] is False


def test_the_warning_gives_the_figures():
    summary = {"constraint_met": False, "constrained": "distortion", "target": 0.01,
               "mse": 0.0125, "relative_error": 0.25, "multiplier": 0.9999,
               "saturated_fraction": 0.8}
    warning = constraint_warning(summary)
    assert "held-out distortion is 0.0125 (+25.0%)" in warning
    assert "at its limit for 80% of the updates" in warning


@pytest.mark.parametrize("name", ["lagrangian", "geco", "dco", "rate"])
def test_a_moving_multiplier_never_recompiles_the_loss(name):
    """The loss reads the multiplier (and GECO's average) from a tensor updated in place, so a
    compiled training step is compiled once however the controller moves."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    config = load_config("digits", {"controller": name, "distortion_target": 0.02,
                                    "rate_target": 0.05})
    controller = build_controller(config)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(controller.loss, backend="eager", fullgraph=True)
    rate = torch.tensor(0.1, requires_grad=True)
    distortion = torch.tensor(0.03, requires_grad=True)
    values = []
    for step in range(6):
        values.append(compiled(rate, distortion).item())
        assert values[-1] == pytest.approx(controller.loss(rate, distortion).item(), rel=1e-6)
        controller.update(0.1 + 0.02 * step, 0.01 - 0.001 * step)   # R high, D low: it moves
    assert counters["stats"]["unique_graphs"] == 1
    assert len(set(values)) == len(values)   # every update moved the loss, compiled or not
    torch._dynamo.reset()


def lagging_model_rate(controller, steps: int) -> list[float]:
    """The batch rates of a model whose rate follows the weight on rate eta with a lag (it
    moves a tenth of the way to its response each update, as Adam's momentum and a learning
    decoder make it), and whose response drifts: the eta that holds the target falls from 0.5
    to 0.02 over the first 100 updates, as the weight on distortion buys more once the decoder
    has learned (the 200-step progressive experiment's regime)."""
    rate, rates = RATE_TARGET, []
    for step in range(steps):
        holding = 0.5 * (0.02 / 0.5) ** min(1.0, step / 100)   # the eta that meets the target
        response = RATE_TARGET * (holding / controller.multiplier) ** 0.5
        rate += 0.1 * (response - rate)
        controller.update(rate=rate, distortion=0.05)
        rates.append(rate)
    return rates


def test_the_rate_controllers_weight_follows_a_learning_decoders_distortion():
    """When the weight that holds the rate falls because the decoder learns (the distortion,
    and with it the slope -dD/dR, falls ten-fold), the controller's odds follow the distortion
    at once: the rate never strays far from its target, where control on the weight alone
    lags behind the fall and leaves the rate under its target for most of the run."""
    controller = make("rate", multiplier_init=0.5)
    rate, worst = RATE_TARGET, 0.0
    for step in range(200):
        distortion = 0.5 * (0.05 / 0.5) ** min(1.0, step / 100)
        holding_odds = 2.0 * distortion               # the odds that meet the target here
        odds = controller.multiplier / (1.0 - controller.multiplier)
        rate += 0.1 * (RATE_TARGET * (holding_odds / odds) ** 0.5 - rate)
        controller.update(rate=rate, distortion=distortion)
        worst = max(worst, abs(rate / RATE_TARGET - 1))
    assert worst < 0.08
    assert controller.multiplier / (1 - controller.multiplier) == pytest.approx(0.1, rel=0.05)


def test_the_rate_controller_holds_its_target_while_the_model_lags_and_drifts():
    """A weight on rate that must fall 25-fold within the run, read through a lagging model:
    the rate of the last 50 of 200 updates is within 2% of the target."""
    controller = make("rate", multiplier_init=0.5)
    rates = lagging_model_rate(controller, 200)
    assert abs(np.mean(rates[-50:]) / RATE_TARGET - 1) < 0.02
    assert controller.multiplier == pytest.approx(0.02, rel=0.2)
