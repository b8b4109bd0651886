"""Controllers own the multiplier of a constrained rate-distortion objective, and nothing else.

The interface every controller keeps:

- `loss(rate, distortion)`: the scalar to minimise. The multiplier enters as a constant: no
  gradient flows into it from the model's loss, and `loss` changes no state (the trainer also
  calls it on held-out batches). What it reads that changes between updates (the multiplier,
  GECO's average) it reads from `loss_inputs`, a small tensor on the training device that
  `update` overwrites in place: a compiled training step sees it as an input, so a new value
  never recompiles it (a Python float would be a constant of the compiled graph, and a CUDA
  graph would have to be recaptured), and setting it needs no copy back to the host.
- `update(rate, distortion)`: one multiplier step from the rate and distortion of the update the
  trainer just applied, as plain floats already averaged over the batch (under DDP: over every
  rank's batch, so every rank takes the same step).
- `multiplier`: the current value, for logs and summaries.
- `at_bound()`: whether the multiplier sits at one of its limits.
- `state_dict()` / `load_state_dict()`: everything needed to resume exactly.

Every controller also counts its updates and how many of them ended with the multiplier
*saturated*: at the limit that weights the constrained quantity most, where it can push no
harder. A multiplier saturated for most of a run means the target was out of reach
(`constraint_summary`).

Units: rate R in nats per dimension, distortion D as MSE per dimension on the [-1, 1] scale.

Scale. The papers' objectives R + lam * (D - c) (GECO) and R + lam * (D / c - 1) (D-CO) put a
weight of up to lam / c ~ 1e6 on D, which would turn VDVAE's absolute gradient-norm thresholds
(`grad_clip` 200, `skip_threshold` 500) into "skip every update". So every controller here
returns its paper's objective divided by a detached positive normaliser (the sum of the weights
on R and D, or a constant). Within a step that is one positive constant: the gradient direction
is the paper's, and Adam, whose steps do not change when its gradients are rescaled by a
constant (and barely when by a slowly drifting one), takes the paper's steps, while the
gradient norm stays on the scale of the projected Lagrangian's convex combination
(1 - lam) * R + lam * D. (Unnormalised, D-CO's first update on digits would have a gradient
norm of ~2e5 and be skipped, and so would every later one.)
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from progvae.config import Config
from progvae.errors import UserError

SATURATED_MAJORITY = 0.5  # saturated for more than this fraction of the updates: target missed


class Controller:
    """The shared bookkeeping: the target, the update counters and the state round trip.

    A subclass implements `loss`, `step` (the multiplier update proper), `multiplier`, and,
    where it has limits, `at_bound` and `saturated`; `extra_state` / `load_extra_state` carry
    its own state.
    """

    name = ""
    constrained: str | None = "distortion"   # the quantity held to the target (None: no target)
    target_field = "distortion_target"       # the config field the target is read from (a
                                             # sweep over targets sets it)

    @classmethod
    def from_config(cls, config: Config) -> "Controller":
        """This controller with its target and settings from `config`, each checked: a value
        out of range is a UserError naming the flag."""
        raise NotImplementedError

    def __init__(self, target: float | None):
        self.target = target
        self.updates = 0             # multiplier updates taken
        self.saturated_updates = 0   # of which ended with the multiplier saturated
        self._inputs: torch.Tensor | None = None

    @property
    def loss_inputs(self) -> torch.Tensor:
        """The changing values `loss` reads (`input_values`), as one float32 tensor; it lives on
        the device `to` moved it to and is overwritten in place after every update."""
        if self._inputs is None:
            self._inputs = torch.tensor(self.input_values(), dtype=torch.float32)
        return self._inputs

    def to(self, device: torch.device | str) -> "Controller":
        """Keep `loss_inputs` on `device` (the training device)."""
        self._inputs = self.loss_inputs.to(device)
        return self

    def input_values(self) -> list[float]:
        """What `loss` reads that updates change: by default the multiplier."""
        return [self.multiplier]

    def _publish(self) -> None:
        """Write the current values into `loss_inputs` in place (a scalar fill each: no
        host-device synchronisation)."""
        inputs = self.loss_inputs
        for index, value in enumerate(self.input_values()):
            inputs[index].fill_(value)

    # -- the interface -------------------------------------------------------------------------
    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, rate: float, distortion: float) -> None:
        self.step(float(rate), float(distortion))
        self.updates += 1
        self.saturated_updates += int(self.saturated())
        self._publish()

    @property
    def multiplier(self) -> float:
        raise NotImplementedError

    def at_bound(self) -> bool:
        return False

    def saturated(self) -> bool:
        """At the limit that puts the most weight on the constrained quantity."""
        return False

    @property
    def saturated_fraction(self) -> float:
        return self.saturated_updates / self.updates if self.updates else 0.0

    def state_dict(self) -> dict:
        return {"name": self.name, "updates": self.updates,
                "saturated_updates": self.saturated_updates, **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise UserError(f"The checkpoint holds a '{state.get('name')}' controller, not "
                            f"'{self.name}'; pass --controller={state.get('name')} to continue "
                            "it, or a new --out.")
        # Checkpoints written before the counters existed resume with them at zero.
        self.updates = state.get("updates", 0)
        self.saturated_updates = state.get("saturated_updates", 0)
        self.load_extra_state(state)
        self._publish()

    # -- for subclasses ------------------------------------------------------------------------
    def step(self, rate: float, distortion: float) -> None:
        """The multiplier update; fixed-weight controllers keep this no-op."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class LagrangianController(Controller):
    """Projected Lagrangian of paper 003 A.5 (= paper 002 B.2): distortion-targeted training.

    Model objective (eq. 10): minimise (1 - lam) * R + lam * D, lam held constant (a Python
    float, so nothing reaches it from the model's loss).
    Multiplier objective (eq. 11): maximise lam * (D_ema - target) by Adam with betas
    (0, 0.999), lr 2e-4, where D_ema is an exponential moving average (rate `distortion_ema`,
    0.99 in the paper) of the detached batch distortion, started at the first batch's value.
    After each step lam is projected onto [multiplier_min, multiplier_max] = [1e-4, 0.9999]; it
    starts at 0.9999, which weights rate by only 1e-4 at first and so mimics KL annealing.

    D_ema > target raises lam (more weight on D); D_ema < target lowers it. Saturated at the top
    of the interval. The objective is already a convex combination, so the normaliser is 1.
    """

    name = "lagrangian"

    @classmethod
    def from_config(cls, config: Config) -> "LagrangianController":
        return cls(_distortion_target(config), **cls.multiplier_settings(config))

    @staticmethod
    def multiplier_settings(config: Config) -> dict:
        """The projected-Adam multiplier's settings, shared with the `rate` scheme."""
        return {"init": config.multiplier_init, "minimum": config.multiplier_min,
                "maximum": config.multiplier_max, "lr": config.multiplier_lr,
                "beta2": config.multiplier_beta2, "ema": config.distortion_ema}

    def __init__(self, target: float, init: float = 0.9999, minimum: float = 1e-4,
                 maximum: float = 0.9999, lr: float = 2e-4, beta2: float = 0.999,
                 ema: float = 0.99):
        super().__init__(target)
        self.minimum, self.maximum = minimum, maximum
        self.ema = ema
        self.lam = torch.tensor(float(init), dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.lam], lr=lr, betas=(0.0, beta2))
        self.tracked: float | None = None   # EMA of the constrained quantity
        self.lam_value = float(init)        # lam as a Python float (see _sync)

    @property
    def multiplier(self) -> float:
        return self.lam_value

    def _sync(self) -> None:
        """Mirror lam in a float, for logs and for `loss_inputs`."""
        self.lam_value = float(self.lam.detach())

    def constrained_value(self, rate: float, distortion: float) -> float:
        """The quantity held to the target: distortion here; rate for rate targeting."""
        return distortion

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        lam = self.loss_inputs[0]
        return (1.0 - lam) * rate + lam * distortion

    def step(self, rate: float, distortion: float) -> None:
        value = self.constrained_value(rate, distortion)
        if self.tracked is None:
            self.tracked = value
        else:
            self.tracked = self.ema * self.tracked + (1.0 - self.ema) * value
        self.optimizer.zero_grad(set_to_none=True)
        # Maximise lam * (tracked - target) == minimise its negative.
        (-(self.lam * (self.tracked - self.target))).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.lam.clamp_(self.minimum, self.maximum)
        self._sync()

    def at_bound(self) -> bool:
        return self.saturated() or self.multiplier <= self.minimum * (1 + 1e-6)

    def saturated(self) -> bool:
        return self.multiplier >= self.maximum * (1 - 1e-9)

    def extra_state(self) -> dict:
        return {"lam": self.multiplier, "tracked": self.tracked,
                # a copy: Adam's state tensors are updated in place by later steps
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_extra_state(self, state: dict) -> None:
        with torch.no_grad():
            self.lam.fill_(state["lam"])
        self._sync()
        self.tracked = state["tracked"]
        self.optimizer.load_state_dict(state["optimizer"])


class RateController(LagrangianController):
    """Rate targeting (gamma-optimal training), paper 003 A.5, last sentence, and §4 eq. 1.

    The `lagrangian` scheme with the roles of R and D swapped: minimise (1 - eta) * D + eta * R
    with eta constant, and maximise eta * (R_ema - rate_target) by the same projected Adam, with
    R_ema the moving average (rate `distortion_ema`) of the detached batch rate, in nats per
    dimension. `multiplier` is eta, the weight on rate: R_ema above the target raises it (less
    weight on D), below the target lowers it. Saturated at the top of [1e-4, 0.9999].

    `init` is the initial weight on *distortion*, as for the distortion-targeted scheme, so eta
    starts at 1 - 0.9999 = 1e-4: rate weighted by only 1e-4 at first, the KL annealing that
    A.5 starts with (a literal swap, eta = 0.9999, would start by collapsing the posterior).
    """

    def __init__(self, target: float, init: float = 0.9999, **settings):
        super().__init__(target, init=1.0 - init, **settings)

    name = "rate"
    constrained = "rate"
    target_field = "rate_target"

    @classmethod
    def from_config(cls, config: Config) -> "RateController":
        if not config.rate_target > 0:
            raise UserError(
                f"The rate target must be a positive KL in nats per dimension for "
                f"--controller=rate (e.g. --rate_target=0.1); got {config.rate_target}.")
        return cls(config.rate_target, **cls.multiplier_settings(config))

    def constrained_value(self, rate: float, distortion: float) -> float:
        return rate

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        eta = self.loss_inputs[0]
        return (1.0 - eta) * distortion + eta * rate


class GECOController(Controller):
    """GECO, paper 004 §3.4 and Algorithm 1, with the reconstruction-error constraint
    C = D - target (Table 1, RE, with kappa^2 = target).

    Model objective (eq. 2): minimise R + lam * C^t, lam constant. C^t is Algorithm 1's
    stop-gradient construction C^t = C_hat + StopGradient(C_ma - C_hat): its value is the
    moving average C_ma of the constraint, its gradient that of this batch's C_hat = D - target
    (the moving average is never backpropagated through). C_ma starts at the first batch's
    C_hat and then follows C_ma <- alpha * C_ma + (1 - alpha) * C_hat with alpha = `geco_ema`
    (0.99, paper 004 §4.1); C_hat enters it detached.
    Multiplier step: log lam <- log lam + geco_lr * C_ma (Algorithm 1: Delta log lam ∝ C^t,
    whose value is C_ma; the caption writes lam <- lam * exp(C^t) up to a factor), so lam
    stays positive, grows while the average distortion is above the target and shrinks below.
    lam starts at 1 (Algorithm 1). The paper leaves lam unbounded; here it is clipped to
    [geco_min, geco_max] so that an unreachable target saturates instead of overflowing.

    `loss` returns eq. 2 divided by the detached 1 + lam (module docstring), i.e. the convex
    combination (R + lam * C^t) / (1 + lam): GECO's lam is the odds lam_A5 / (1 - lam_A5) of the
    projected Lagrangian's weight. `loss` computes this batch's C_ma without storing it;
    `update`, called with the same batch's values, stores it and steps lam.
    """

    name = "geco"

    @classmethod
    def from_config(cls, config: Config) -> "GECOController":
        target = _distortion_target(config)
        _check_range(config, [
            ("geco_init", 0 < config.geco_min <= config.geco_init <= config.geco_max,
             f"between geco_min={config.geco_min:g} and geco_max={config.geco_max:g}, "
             "both positive"),
            ("geco_lr", config.geco_lr > 0, "positive"),
            ("geco_ema", 0 <= config.geco_ema < 1, "in [0, 1)")])
        return cls(target, init=config.geco_init, lr=config.geco_lr, ema=config.geco_ema,
                   minimum=config.geco_min, maximum=config.geco_max)

    def __init__(self, target: float, init: float = 1.0, lr: float = 1.0, ema: float = 0.99,
                 minimum: float = 1e-4, maximum: float = 1e4):
        super().__init__(target)
        self.lr, self.ema = lr, ema
        self.log_min, self.log_max = math.log(minimum), math.log(maximum)
        self.log_lam = min(max(math.log(init), self.log_min), self.log_max)
        self.constraint_average: float | None = None   # C_ma of Algorithm 1

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_lam)

    def _next_average(self, constraint: float) -> float:
        """C_ma^t from C_ma^(t-1) and this batch's C_hat^t."""
        if self.constraint_average is None:
            return constraint
        return self.ema * self.constraint_average + (1.0 - self.ema) * constraint

    def input_values(self) -> list[float]:
        """lam, C_ma (0 before the first update) and whether C_ma has started (1 or 0)."""
        started = self.constraint_average is not None
        return [self.multiplier, self.constraint_average if started else 0.0, float(started)]

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        lam, previous, started = self.loss_inputs.unbind()
        batch_constraint = distortion - self.target                      # C_hat, differentiable
        detached = batch_constraint.detach()
        # C_ma, a constant: the first batch's C_hat, then the moving average (`_next_average`)
        average = started * (self.ema * previous + (1.0 - self.ema) * detached) \
            + (1.0 - started) * detached
        constraint = batch_constraint + (average - detached)             # C^t
        return (rate + lam * constraint) / (1.0 + lam)

    def step(self, rate: float, distortion: float) -> None:
        self.constraint_average = self._next_average(distortion - self.target)
        self.log_lam = min(max(self.log_lam + self.lr * self.constraint_average, self.log_min),
                           self.log_max)

    def at_bound(self) -> bool:
        return self.saturated() or self.log_lam <= self.log_min

    def saturated(self) -> bool:
        return self.log_lam >= self.log_max

    def extra_state(self) -> dict:
        return {"log_lam": self.log_lam, "constraint_average": self.constraint_average}

    def load_extra_state(self, state: dict) -> None:
        self.log_lam = state["log_lam"]
        self.constraint_average = state["constraint_average"]


class DCOController(Controller):
    """D-CO, paper 000 §3.1 eq. 3 and §3.1.1: the constraint normalised by its target.

    Model objective (eq. 3): minimise R + lam * (D / c - 1), lam constant, c = target.
    Multiplier: mu = log lam, updated by torch's SGD with momentum 0.99 and dampening equal to
    the momentum, lr 5e-3 (§4.1), to *maximise* eq. 3 — but along D / c - 1 rather than its
    true gradient (D / c - 1) * lam (§3.1.1): SGD is handed -(D / c - 1) to descend, with D the
    detached batch distortion. Torch's momentum buffer starts at the first such value and then
    averages them, so a long stretch above a strict target delays the drop (paper 000 Fig. 3).
    mu is clipped so that lam <= 1e3, and starts at the clip (§3.1.1); it has no lower limit.
    Saturated at the clip.

    `loss` returns eq. 3 divided by the detached 1 + lam / c, the sum of its weights on R and D
    (module docstring).
    """

    name = "dco"

    @classmethod
    def from_config(cls, config: Config) -> "DCOController":
        target = _distortion_target(config)
        _check_range(config, [("dco_lr", config.dco_lr > 0, "positive"),
                              ("dco_momentum", 0 <= config.dco_momentum < 1, "in [0, 1)"),
                              ("dco_max", config.dco_max > 0, "positive")])
        return cls(target, lr=config.dco_lr, momentum=config.dco_momentum,
                   maximum=config.dco_max)

    def __init__(self, target: float, lr: float = 5e-3, momentum: float = 0.99,
                 maximum: float = 1e3):
        super().__init__(target)
        self.log_max = math.log(maximum)
        self.log_lam = torch.tensor(self.log_max, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.log_lam], lr=lr, momentum=momentum,
                                         dampening=momentum)
        self.log_lam_value = self.log_max   # log lam as a Python float (see _sync)

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_lam_value)

    def _sync(self) -> None:
        """Mirror log lam in a float, for logs and `loss_inputs`."""
        self.log_lam_value = float(self.log_lam.detach())

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        lam = self.loss_inputs[0]
        return (rate + lam * (distortion / self.target - 1.0)) / (1.0 + lam / self.target)

    def step(self, rate: float, distortion: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        # Ascent on mu along (D / c - 1): descend along its negative.
        self.log_lam.grad = torch.tensor(-(distortion / self.target - 1.0), dtype=torch.float64)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.log_lam.clamp_(max=self.log_max)
        self._sync()

    def at_bound(self) -> bool:
        return self.saturated()

    def saturated(self) -> bool:
        return self.log_lam_value >= self.log_max - 1e-12

    def extra_state(self) -> dict:
        return {"log_lam": self.log_lam_value,
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_extra_state(self, state: dict) -> None:
        with torch.no_grad():
            self.log_lam.fill_(state["log_lam"])
        self._sync()
        self.optimizer.load_state_dict(state["optimizer"])


class HingeController(Controller):
    """D-hinge, paper 000 eq. 4: minimise R + lam * max(D / c - 1, 0) with lam fixed.

    No multiplier update: below the target D gets no gradient at all and the model trades
    distortion for rate freely until D crosses c again. lam is `hinge_weight` (the paper tries
    0.01 to 100). `loss` divides by the constant 1 + lam / c (module docstring).
    """

    name = "hinge"

    @classmethod
    def from_config(cls, config: Config) -> "HingeController":
        target = _distortion_target(config)
        _check_range(config, [("hinge_weight", config.hinge_weight > 0, "positive")])
        return cls(target, weight=config.hinge_weight)

    def __init__(self, target: float, weight: float = 1.0):
        super().__init__(target)
        self.weight = weight

    @property
    def multiplier(self) -> float:
        return self.weight

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        excess = torch.clamp(distortion / self.target - 1.0, min=0.0)
        return (rate + self.weight * excess) / (1.0 + self.weight / self.target)


class BetaController(Controller):
    """beta-VAE (Higgins et al. 2017; the baseline of paper 000 §4.3): minimise D + beta * R
    with beta fixed (`beta`). No target and no update. `loss` divides by the constant 1 + beta
    (module docstring)."""

    name = "beta"
    constrained = None
    target_field = "beta"   # no target: a sweep sets the fixed weight

    @classmethod
    def from_config(cls, config: Config) -> "BetaController":
        if not config.beta >= 0:
            raise UserError(f"--beta must be a non-negative weight on rate; got {config.beta}.")
        return cls(config.beta)

    def __init__(self, beta: float = 1.0):
        super().__init__(None)
        self.beta = beta

    @property
    def multiplier(self) -> float:
        return self.beta

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        return (distortion + self.beta * rate) / (1.0 + self.beta)


# The registry: a new controller is one Controller subclass (with its name, target_field and
# from_config) added here, plus its test.
CONTROLLERS: dict[str, type[Controller]] = {controller.name: controller for controller in (
    LagrangianController, GECOController, DCOController, HingeController, BetaController,
    RateController)}

# The config field each controller's target (for `beta`: its fixed weight) is read from.
TARGET_FIELDS = {name: controller.target_field for name, controller in CONTROLLERS.items()}


def check_controller_name(name: str) -> None:
    if name not in CONTROLLERS:
        raise UserError(f"Unknown controller '{name}'; choose one of "
                        f"{', '.join(CONTROLLERS)} (--controller=NAME).")


def build_controller(config: Config) -> Controller:
    """The controller named by `config.controller`, with its target and settings from the
    config; a missing or non-positive target is a UserError naming the flag to pass."""
    check_controller_name(config.controller)
    # Its loss inputs exist from the start (on the CPU until the trainer moves them), so a
    # compiled step never sees them being created.
    return CONTROLLERS[config.controller].from_config(config).to("cpu")


def _distortion_target(config: Config) -> float:
    if not config.distortion_target > 0:
        raise UserError(
            f"The distortion target must be a positive MSE per dimension on the [-1, 1] scale "
            f"(e.g. --distortion_target=0.01); got {config.distortion_target}.")
    return config.distortion_target


def _check_range(config: Config, checks: list[tuple[str, bool, str]]) -> None:
    """Each (field, valid, condition) of the chosen controller, or one sentence naming it."""
    for field, valid, condition in checks:
        if not valid:
            raise UserError(f"--{field}={getattr(config, field)} is out of range for "
                            f"--controller={config.controller}; it must be {condition}.")


def check_same_controller(out: str | Path, config: Config) -> None:
    """A run directory trained with one controller may only be continued with the same one
    (its checkpoint holds that controller's state); checked before anything is written."""
    previous = Path(out) / "config.json" if out else None
    if previous is None or not previous.is_file():
        return
    name = json.loads(previous.read_text()).get("controller", config.controller)
    if name != config.controller:
        raise UserError(f"'{out}' holds a run trained with --controller={name}; pass "
                        f"--controller={name} to continue it, or a new --out.")


def constraint_summary(controller: Controller, rate: float, distortion: float,
                       tolerance: float) -> dict:
    """Whether a finished run met its target, for summary.json.

    The constraint counts as met when the held-out value of the constrained quantity is at most
    target * (1 + tolerance) — the controllers hold the *training* average to the target, and
    held-out images come out a little worse — and the multiplier was not saturated for more than
    half of the updates (it sat at its limit, still asking for more than the model gave).
    Under the target is fine: the constraints are inequalities. `beta` has no target: None.
    """
    reached = {"distortion": distortion, "rate": rate}.get(controller.constrained)
    summary = {"controller": controller.name, "constrained": controller.constrained,
               "target": controller.target, "relative_error": None,
               "multiplier_at_bound": controller.at_bound(),
               "saturated_fraction": round(controller.saturated_fraction, 4),
               "constraint_met": None}
    if reached is not None:
        summary["relative_error"] = reached / controller.target - 1.0
        summary["constraint_met"] = bool(
            reached <= controller.target * (1.0 + tolerance)
            and controller.saturated_fraction <= SATURATED_MAJORITY)
    return summary


def constraint_warning(summary: dict) -> str | None:
    """One warning sentence for a run summary (the keys of `constraint_summary` plus "rate",
    "distortion" and "multiplier") whose constraint was not met, else None."""
    if summary["constraint_met"] is not False:
        return None
    quantity = summary["constrained"]
    unit = "MSE/dim" if quantity == "distortion" else "nats/dim"
    return (f"WARNING: the {quantity} target {summary['target']:g} {unit} was not met: the "
            f"held-out {quantity} is {summary[quantity]:.5g} "
            f"({100 * summary['relative_error']:+.1f}%), and the multiplier "
            f"({summary['multiplier']:.4g} now) was at its limit for "
            f"{100 * summary['saturated_fraction']:.0f}% of the updates. Loosen the target, "
            f"train longer, or use a larger model.")
