"""Controllers own the multiplier of a constrained rate-distortion objective, and nothing else.

The interface every controller keeps:

- `loss(rate, distortion)`: the scalar to minimise. The multiplier enters as a constant: no
  gradient flows into it from the model's loss, and `loss` changes no state (the trainer also
  calls it on held-out batches). What it reads that changes between updates (the multiplier,
  GECO's average) it reads from `loss_inputs`, a small tensor on the training device that
  `update` overwrites in place: a compiled training step sees it as an input, so a new value
  never recompiles it (a Python float would be a constant of the compiled graph, and a CUDA
  graph would have to be recaptured).
- `update(rate, distortion, applied)`: one multiplier step from the rate and distortion of the
  update the trainer just made, already averaged over the batch (under DDP: over every rank's
  batch, so every rank takes the same step). They are 0-d tensors on the training device (or
  floats), and `applied` is the trainer's on-device decision (False: the update was skipped,
  and nothing changes). Every value a controller keeps lives on that device too and is
  computed there, so an update never waits for the host: the trainer decides, steps and logs
  without a host-device synchronisation per step.
- `multiplier`: the current value as a float (a read from the device: for logs and summaries).
- `at_bound()`: whether the multiplier sits at one of its limits.
- `state_dict()` / `load_state_dict()`: everything needed to resume exactly, as plain floats.

Every controller also counts its updates and how many of them ended with the multiplier
*saturated*: at the limit that weights the constrained quantity most, where it can push no
harder. A multiplier saturated for most of a run means the target was out of reach
(`constraint_summary`).

Units: rate R in nats per dimension, distortion D as MSE per dimension on the [-1, 1] scale.

Scale. The papers' objectives R + λ * (D - c) (GECO) and R + λ * (D / c - 1) (D-CO) put a
weight of up to λ / c ~ 1e6 on D, which would turn VDVAE's absolute gradient-norm thresholds
(`grad_clip` 200, `skip_threshold` 500) into "skip every update". So every controller here
returns its paper's objective divided by a detached positive normaliser (the sum of the weights
on R and D, or a constant). Within a step that is one positive constant: the gradient direction
is the paper's, and Adam, whose steps do not change when its gradients are rescaled by a
constant (and barely when by a slowly drifting one), takes the paper's steps, while the
gradient norm stays on the scale of the projected Lagrangian's convex combination
(1 - λ) * R + λ * D. (Unnormalised, D-CO's first update on digits would have a gradient
norm of ~2e5 and be skipped, and so would every later one.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.core.untrusted import read_json

SATURATED_MAJORITY = 0.5  # saturated for more than this fraction of the updates: target missed
ADAM_EPS = 1e-8           # the multiplier's Adam (torch's default)


class Controller:
    """The shared bookkeeping: the target, the update counters and the state round trip.

    A subclass implements `loss`, `multiplier_tensor`, and where it moves its multiplier `step`
    (the proposed new values of its state tensors) and `saturated_tensor`; `extra_state` /
    `load_extra_state` carry its own state.
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
        # [updates taken, of which ended with the multiplier saturated]
        self.counts = torch.zeros(2, dtype=torch.float64)
        self._inputs: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def loss_inputs(self) -> torch.Tensor:
        """The changing values `loss` reads (`input_tensors`), as one float32 tensor; it lives
        on the device `to` moved it to and is overwritten in place after every update."""
        if self._inputs is None:
            self._inputs = torch.stack(self.input_tensors()).float()
        return self._inputs

    def to(self, device: torch.device | str) -> "Controller":
        """Keep every tensor of the controller (its state and `loss_inputs`) on `device`, the
        training device."""
        self.loss_inputs   # created before the move
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def input_tensors(self) -> list[torch.Tensor]:
        """What `loss` reads that updates change, as 0-d tensors: by default the multiplier."""
        return [self.multiplier_tensor()]

    def _publish(self) -> None:
        """Write the current values into `loss_inputs` in place, on the device."""
        self.loss_inputs.copy_(torch.stack(self.input_tensors()))

    def _constant(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64, device=self.device)

    # -- the interface -------------------------------------------------------------------------
    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, rate: torch.Tensor | float, distortion: torch.Tensor | float,
               applied: torch.Tensor | None = None) -> None:
        """One multiplier step, taken where `applied` (a 0-d bool tensor; None: True)."""
        rate = torch.as_tensor(rate, dtype=torch.float64, device=self.device)
        distortion = torch.as_tensor(distortion, dtype=torch.float64, device=self.device)
        applied = (torch.ones((), dtype=torch.bool, device=self.device) if applied is None
                   else applied.to(device=self.device, dtype=torch.bool))
        for name, proposed in self.step(rate, distortion).items():
            current = getattr(self, name)
            current.copy_(torch.where(applied, proposed, current))
        taken = applied.to(torch.float64)
        self.counts += torch.stack([taken, taken * self.saturated_tensor()])
        self._publish()

    def multiplier_tensor(self) -> torch.Tensor:
        """The multiplier, a 0-d float64 tensor on the device."""
        raise NotImplementedError

    @property
    def multiplier(self) -> float:
        return float(self.multiplier_tensor())

    def at_bound(self) -> bool:
        return False

    def saturated_tensor(self) -> torch.Tensor:
        """At the limit that puts the most weight on the constrained quantity (0-d, 0 or 1)."""
        return self._constant(0.0)

    def saturated(self) -> bool:
        return bool(self.saturated_tensor())

    @property
    def updates(self) -> int:
        return int(self.counts[0])

    @updates.setter
    def updates(self, value: int) -> None:
        self.counts[0] = value

    @property
    def saturated_updates(self) -> int:
        return int(self.counts[1])

    @saturated_updates.setter
    def saturated_updates(self, value: int) -> None:
        self.counts[1] = value

    @property
    def saturated_fraction(self) -> float:
        updates = self.updates
        return self.saturated_updates / updates if updates else 0.0

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
    def step(self, rate: torch.Tensor, distortion: torch.Tensor) -> dict[str, torch.Tensor]:
        """The multiplier update: the new value of each state tensor (by attribute name), as
        computed from this update's rate and distortion; fixed-weight controllers have none."""
        return {}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class BoundedMultiplier(Controller):
    """What the `lagrangian` and `rate` schemes share: a weight λ in [minimum, maximum] on
    the constrained term, moved by an exponential moving average (rate `ema`) of the
    constrained quantity, and saturated at the top of that interval."""

    def __init__(self, target: float, multiplier: float, minimum: float, maximum: float,
                 ema: float):
        super().__init__(target)
        self.minimum, self.maximum, self.ema = minimum, maximum, ema
        self.multiplier_value = torch.tensor(float(multiplier), dtype=torch.float64)
        self.tracked = torch.zeros((), dtype=torch.float64)   # EMA of the constrained quantity
        self.started = torch.zeros((), dtype=torch.float64)   # 1 once `tracked` holds a value

    def multiplier_tensor(self) -> torch.Tensor:
        return self.multiplier_value

    def track(self, value: torch.Tensor) -> torch.Tensor:
        """The moving average of the constrained quantity after `value`."""
        return self.moving_average(value, self.tracked, self.started > 0)

    def moving_average(self, value: torch.Tensor, average: torch.Tensor,
                       started: torch.Tensor) -> torch.Tensor:
        """`average` moved towards `value` at rate `ema`, or `value` itself where the average
        has not `started` (the first value starts it)."""
        return torch.where(started, self.ema * average + (1.0 - self.ema) * value, value)

    def at_bound(self) -> bool:
        return self.saturated() or self.multiplier <= self.minimum * (1 + 1e-6)

    def saturated_tensor(self) -> torch.Tensor:
        return (self.multiplier_value >= self.maximum * (1 - 1e-9)).to(torch.float64)

    def extra_state(self) -> dict:
        return {"multiplier": self.multiplier,
                "tracked": float(self.tracked) if bool(self.started) else None}

    def load_extra_state(self, state: dict) -> None:
        # "lam" and "log_lam": the names in checkpoints written before the rename
        self.multiplier_value.fill_(state.get("multiplier", state.get("lam")))
        self.started.fill_(state["tracked"] is not None)
        self.tracked.fill_(state["tracked"] or 0.0)


class LagrangianController(BoundedMultiplier):
    """Projected Lagrangian of paper 003 A.5 (= paper 002 B.2): distortion-targeted training.

    Model objective (eq. 10): minimise (1 - λ) * R + λ * D, λ held constant (read from
    `loss_inputs`, so nothing reaches it from the model's loss).
    Multiplier objective (eq. 11): maximise λ * (D_ema - target) by Adam with betas
    (0, 0.999), lr 2e-4, where D_ema is an exponential moving average (rate `distortion_ema`,
    0.99 in the paper) of the detached batch distortion, started at the first batch's value.
    After each step λ is projected onto [multiplier_min, multiplier_max] = [1e-4, 0.9999]; it
    starts at 0.9999, which weights rate by only 1e-4 at first and so mimics KL annealing.

    D_ema > target raises λ (more weight on D); D_ema < target lowers it. Saturated at the top
    of the interval. The objective is already a convex combination, so the normaliser is 1.
    """

    name = "lagrangian"

    @classmethod
    def from_config(cls, config: Config) -> "LagrangianController":
        return cls(_distortion_target(config), **cls.multiplier_settings(config))

    @staticmethod
    def multiplier_settings(config: Config) -> dict:
        """The projected-Adam multiplier's settings."""
        return {"init": config.multiplier_init, "minimum": config.multiplier_min,
                "maximum": config.multiplier_max, "lr": config.multiplier_lr,
                "beta2": config.multiplier_beta2, "ema": config.distortion_ema}

    def __init__(self, target: float, init: float = 0.9999, minimum: float = 1e-4,
                 maximum: float = 0.9999, lr: float = 2e-4, beta2: float = 0.999,
                 ema: float = 0.99):
        super().__init__(target, init, minimum, maximum, ema)
        self.lr, self.beta2 = lr, beta2
        # Adam's second moment and step count (its first moment, at beta1 = 0, is the gradient)
        self.second_moment = torch.zeros((), dtype=torch.float64)
        self.adam_steps = torch.zeros((), dtype=torch.float64)

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        multiplier = self.loss_inputs[0]
        return (1.0 - multiplier) * rate + multiplier * distortion

    def step(self, rate: torch.Tensor, distortion: torch.Tensor) -> dict[str, torch.Tensor]:
        tracked = self.track(distortion)
        # Maximise λ * (tracked - target), i.e. descend its negative, whose gradient in λ
        # is -(tracked - target): torch's Adam step with betas (0, beta2), done on the device.
        grad = -(tracked - self.target)
        steps = self.adam_steps + 1.0
        second_moment = self.second_moment * self.beta2 + (1.0 - self.beta2) * grad * grad
        denominator = second_moment.sqrt() / (1.0 - self.beta2 ** steps).sqrt() + ADAM_EPS
        multiplier = (self.multiplier_value - self.lr * grad / denominator).clamp(self.minimum,
                                                                                 self.maximum)
        return {"tracked": tracked, "started": torch.ones_like(self.started),
                "second_moment": second_moment, "adam_steps": steps, "multiplier_value": multiplier}

    def extra_state(self) -> dict:
        return {**super().extra_state(),
                "adam": {"second_moment": float(self.second_moment),
                         "steps": float(self.adam_steps)}}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        second_moment, steps = 0.0, 0.0
        if "adam" in state:
            second_moment, steps = state["adam"]["second_moment"], state["adam"]["steps"]
        elif state.get("optimizer", {}).get("state"):   # by torch.optim.Adam: earlier versions
            adam = next(iter(state["optimizer"]["state"].values()))
            second_moment, steps = float(adam["exp_avg_sq"]), float(adam["step"])
        self.second_moment.fill_(second_moment)
        self.adam_steps.fill_(steps)


class RateController(BoundedMultiplier):
    """Rate targeting (gamma-optimal training), paper 003 §4.1 (lambda*) and A.5 with the roles
    of R and D swapped: minimise (1 - eta) * D + eta * R with eta held constant, and move eta
    so that R_ema, the moving average (rate `rate_ema`) of the detached batch rate in nats per
    dimension, meets `rate_target`. `multiplier` is eta, the weight on rate: a rate above the
    target raises it, below lowers it. Saturated at the top of [multiplier_min,
    multiplier_max].

    The odds eta / (1 - eta) are the Lagrange multiplier of min D subject to R <= target,
    which at the optimum is the slope -dD/dR of the rate-distortion curve. That slope scales
    with the distortion itself (for a Gaussian source D(R) = s^2 exp(-2R) per dimension it is
    2D), so while a decoder learns (a fresh one's distortion falls ten-fold in a couple of
    hundred updates) the weight that holds a rate falls with its distortion. The controller
    therefore sets the odds to exp(u) * D_ema, D_ema the moving average (rate `rate_ema`) of
    the detached batch distortion, and moves u, the odds per unit of distortion, which stays
    nearly put, by proportional-integral control on the relative error
    e = (R_ema - target) / target:

        I <- I + ki * e,   u = I + kp * e,   eta = clip(sigmoid(u + log D_ema), min, max),

    with I held where the odds stay within those bounds (no wind-up). The integral term alone
    is dual ascent on the multiplier, as A.5 does for distortion, in log space, so a step moves
    the odds by a factor; the proportional term answers a rate off its target at once, which
    damps the overshoot the model's lag (its Adam momentum and the rate's average) otherwise
    causes (a "PID Lagrangian", Stooke, Achiam and Abbeel 2020). Until D_ema has a value (the
    first update, or a checkpoint of an earlier scheme) I is set so that eta stays where it is.

    Measured in the 200-step progressive experiment on photo patches (R_K = 0.0334 nats/dim;
    the held-out rate of the EMA weights against the target, and lambda*, the distortion
    reached): the distortion scheme's Adam step ended 37% under the target; PI control of
    log eta alone 19% under at 0.0600, its eta driven up to 0.84 while the fresh decoder's
    distortion was high and then 14-fold down; with the distortion feed-forward
    12% under at 0.0556, eta within [0.07, 0.38]. On `digits` (600 steps) the three end
    within 0.5% of the target, at 0.0538, 0.0536 and 0.0531. Gains of 0.3 and 3 with a 0.8
    average end 9% under on patches but swing eta from 0.93 to 0.01 there, at 0.0598.

    `init` is the initial weight on *distortion*, as for the distortion-targeted scheme, so eta
    starts at 1 - 0.9999 = 1e-4: rate weighted by only 1e-4 at first, the KL annealing that
    A.5 starts with (a literal swap, eta = 0.9999, would start by collapsing the posterior).
    """

    name = "rate"
    constrained = "rate"
    target_field = "rate_target"
    SMALLEST_DISTORTION = 1e-12   # D_ema's floor: a perfect batch must not give log 0

    @classmethod
    def from_config(cls, config: Config) -> "RateController":
        if not config.rate_target > 0:
            raise UserError(
                f"The rate target must be a positive KL in nats per dimension for "
                f"--controller=rate (e.g. --rate_target=0.1); got {config.rate_target}.")
        _check_range(config, [("multiplier_min", config.multiplier_min > 0, "above 0")])
        return cls(config.rate_target, init=config.multiplier_init,
                   minimum=config.multiplier_min, maximum=config.multiplier_max,
                   integral_gain=config.rate_integral_gain,
                   proportional_gain=config.rate_proportional_gain, ema=config.rate_ema)

    def __init__(self, target: float, init: float = 0.9999, minimum: float = 1e-4,
                 maximum: float = 0.9999, integral_gain: float = 0.1,
                 proportional_gain: float = 1.0, ema: float = 0.9):
        multiplier = min(max(1.0 - init, minimum), maximum)   # the weight on rate
        super().__init__(target, multiplier, minimum, maximum, ema)
        self.integral_gain, self.proportional_gain = integral_gain, proportional_gain
        self.integral = torch.zeros((), dtype=torch.float64)              # I
        self.distortion_tracked = torch.zeros((), dtype=torch.float64)    # D_ema; 0: none yet

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        multiplier = self.loss_inputs[0]
        return (1.0 - multiplier) * distortion + multiplier * rate

    def step(self, rate: torch.Tensor, distortion: torch.Tensor) -> dict[str, torch.Tensor]:
        tracked = self.track(rate)
        fresh = self.distortion_tracked <= 0
        distortion_tracked = self.moving_average(distortion, self.distortion_tracked, ~fresh
                                                 ).clamp(min=self.SMALLEST_DISTORTION)
        log_distortion = torch.log(distortion_tracked)
        error = (tracked - self.target) / self.target
        integral = torch.where(fresh, torch.logit(self.multiplier_value) - log_distortion,
                               self.integral)
        low = math.log(self.minimum / (1.0 - self.minimum)) - log_distortion
        high = math.log(self.maximum / (1.0 - self.maximum)) - log_distortion
        integral = torch.minimum(torch.maximum(integral + self.integral_gain * error, low), high)
        multiplier = torch.sigmoid(integral + self.proportional_gain * error + log_distortion)
        return {"tracked": tracked, "started": torch.ones_like(self.started),
                "distortion_tracked": distortion_tracked, "integral": integral,
                "multiplier_value": multiplier.clamp(self.minimum, self.maximum)}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "integral": float(self.integral),
                "distortion_tracked": float(self.distortion_tracked)}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        # A checkpoint of an earlier scheme (Adam-stepped, or PI on log eta) has no D_ema: the
        # next update sets I from eta as the first update of a run does.
        self.distortion_tracked.fill_(state.get("distortion_tracked", 0.0))
        self.integral.fill_(state.get("integral", 0.0) if "distortion_tracked" in state else 0.0)


class GECOController(Controller):
    """GECO, paper 004 §3.4 and Algorithm 1, with the reconstruction-error constraint
    C = D - target (Table 1, RE, with kappa^2 = target).

    Model objective (eq. 2): minimise R + λ * C^t, λ constant. C^t is Algorithm 1's
    stop-gradient construction C^t = C_hat + StopGradient(C_ma - C_hat): its value is the
    moving average C_ma of the constraint, its gradient that of this batch's C_hat = D - target
    (the moving average is never backpropagated through). C_ma starts at the first batch's
    C_hat and then follows C_ma <- alpha * C_ma + (1 - alpha) * C_hat with alpha = `geco_ema`
    (0.99, paper 004 §4.1); C_hat enters it detached.
    Multiplier step: log λ <- log λ + geco_lr * C_ma (Algorithm 1: Delta log λ ∝ C^t,
    whose value is C_ma; the caption writes λ <- λ * exp(C^t) up to a factor), so λ
    stays positive, grows while the average distortion is above the target and shrinks below.
    λ starts at 1 (Algorithm 1). The paper leaves λ unbounded; here it is clipped to
    [geco_min, geco_max] so that an unreachable target saturates instead of overflowing.

    `loss` returns eq. 2 divided by the detached 1 + λ (module docstring), i.e. the convex
    combination (R + λ * C^t) / (1 + λ): GECO's λ is the odds λ_A5 / (1 - λ_A5) of the
    projected Lagrangian's weight. `loss` computes this batch's C_ma without storing it;
    `update`, called with the same batch's values, stores it and steps λ.
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
        self.log_multiplier = torch.tensor(min(max(math.log(init), self.log_min), self.log_max),
                                    dtype=torch.float64)
        self.average = torch.zeros((), dtype=torch.float64)   # C_ma of Algorithm 1
        self.started = torch.zeros((), dtype=torch.float64)   # 1 once C_ma holds a value

    def multiplier_tensor(self) -> torch.Tensor:
        return self.log_multiplier.exp()

    @property
    def constraint_average(self) -> float | None:
        """C_ma, None before the first update."""
        return float(self.average) if bool(self.started) else None

    def input_tensors(self) -> list[torch.Tensor]:
        """λ, C_ma (0 before the first update) and whether C_ma has started (1 or 0)."""
        return [self.multiplier_tensor(), self.average, self.started]

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        multiplier, previous, started = self.loss_inputs.unbind()
        batch_constraint = distortion - self.target                      # C_hat, differentiable
        detached = batch_constraint.detach()
        # C_ma, a constant: the first batch's C_hat, then the moving average (`step`)
        average = started * (self.ema * previous + (1.0 - self.ema) * detached) \
            + (1.0 - started) * detached
        constraint = batch_constraint + (average - detached)             # C^t
        return (rate + multiplier * constraint) / (1.0 + multiplier)

    def step(self, rate: torch.Tensor, distortion: torch.Tensor) -> dict[str, torch.Tensor]:
        constraint = distortion - self.target
        average = torch.where(self.started > 0,
                              self.ema * self.average + (1.0 - self.ema) * constraint, constraint)
        log_multiplier = (self.log_multiplier + self.lr * average).clamp(self.log_min, self.log_max)
        return {"average": average, "started": torch.ones_like(self.started),
                "log_multiplier": log_multiplier}

    def at_bound(self) -> bool:
        return self.saturated() or float(self.log_multiplier) <= self.log_min

    def saturated_tensor(self) -> torch.Tensor:
        return (self.log_multiplier >= self.log_max).to(torch.float64)

    def extra_state(self) -> dict:
        return {"log_multiplier": float(self.log_multiplier),
                "constraint_average": self.constraint_average}

    def load_extra_state(self, state: dict) -> None:
        self.log_multiplier.fill_(state.get("log_multiplier", state.get("log_lam")))
        self.started.fill_(state["constraint_average"] is not None)
        self.average.fill_(state["constraint_average"] or 0.0)


class DCOController(Controller):
    """D-CO, paper 000 §3.1 eq. 3 and §3.1.1: the constraint normalised by its target.

    Model objective (eq. 3): minimise R + λ * (D / c - 1), λ constant, c = target.
    Multiplier: mu = log λ, updated by SGD (torch's rule) with momentum 0.99 and dampening
    equal to the momentum, lr 5e-3 (§4.1), to *maximise* eq. 3 — but along D / c - 1 rather
    than its true gradient (D / c - 1) * λ (§3.1.1): SGD is handed -(D / c - 1) to descend,
    with D the detached batch distortion. The momentum buffer starts at the first such value and then
    averages them, so a long stretch above a strict target delays the drop (paper 000 Fig. 3).
    mu is clipped so that λ <= 1e3, and starts at the clip (§3.1.1); it has no lower limit.
    Saturated at the clip.

    `loss` returns eq. 3 divided by the detached 1 + λ / c, the sum of its weights on R and D
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
        self.lr, self.momentum = lr, momentum
        self.log_max = math.log(maximum)
        self.log_multiplier = torch.tensor(self.log_max, dtype=torch.float64)
        self.momentum_buffer = torch.zeros((), dtype=torch.float64)
        self.started = torch.zeros((), dtype=torch.float64)   # 1 once the buffer holds a value

    def multiplier_tensor(self) -> torch.Tensor:
        return self.log_multiplier.exp()

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        multiplier = self.loss_inputs[0]
        return ((rate + multiplier * (distortion / self.target - 1.0))
                / (1.0 + multiplier / self.target))

    def step(self, rate: torch.Tensor, distortion: torch.Tensor) -> dict[str, torch.Tensor]:
        # Ascent on mu along (D / c - 1): torch's SGD step (momentum, dampening = momentum)
        # descending its negative, done on the device. The buffer starts at the first value.
        grad = -(distortion / self.target - 1.0)
        buffer = torch.where(self.started > 0,
                             self.momentum * self.momentum_buffer + (1.0 - self.momentum) * grad,
                             grad)
        log_multiplier = (self.log_multiplier - self.lr * buffer).clamp(max=self.log_max)
        return {"momentum_buffer": buffer, "started": torch.ones_like(self.started),
                "log_multiplier": log_multiplier}

    def at_bound(self) -> bool:
        return self.saturated()

    def saturated_tensor(self) -> torch.Tensor:
        return (self.log_multiplier >= self.log_max - 1e-12).to(torch.float64)

    def extra_state(self) -> dict:
        return {"log_multiplier": float(self.log_multiplier),
                "momentum_buffer": float(self.momentum_buffer) if bool(self.started) else None}

    def load_extra_state(self, state: dict) -> None:
        self.log_multiplier.fill_(state.get("log_multiplier", state.get("log_lam")))
        buffer = state.get("momentum_buffer")
        if "optimizer" in state:   # written by torch.optim.SGD: earlier versions
            saved = next(iter(state["optimizer"].get("state", {}).values()), {})
            buffer = None if saved.get("momentum_buffer") is None \
                else float(saved["momentum_buffer"])
        self.started.fill_(buffer is not None)
        self.momentum_buffer.fill_(buffer or 0.0)


class HingeController(Controller):
    """D-hinge, paper 000 eq. 4: minimise R + λ * max(D / c - 1, 0) with λ fixed.

    No multiplier update: below the target D gets no gradient at all and the model trades
    distortion for rate freely until D crosses c again. λ is `hinge_weight` (the paper tries
    0.01 to 100). `loss` divides by the constant 1 + λ / c (module docstring).
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

    def multiplier_tensor(self) -> torch.Tensor:
        return self._constant(self.weight)

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

    def multiplier_tensor(self) -> torch.Tensor:
        return self._constant(self.beta)

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
    name = read_json(previous, fix="restore it, or pass a new --out").get("controller",
                                                                          config.controller)
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
    "mse" (the distortion) and "multiplier") whose constraint was not met, else None."""
    if summary["constraint_met"] is not False:
        return None
    quantity = summary["constrained"]
    unit = "MSE/dim" if quantity == "distortion" else "nats/dim"
    reached = summary["mse"] if quantity == "distortion" else summary["rate"]
    return (f"WARNING: the {quantity} target {summary['target']:g} {unit} was not met: the "
            f"held-out {quantity} is {reached:.5g} "
            f"({100 * summary['relative_error']:+.1f}%), and the multiplier "
            f"({summary['multiplier']:.4g} now) was at its limit for "
            f"{100 * summary['saturated_fraction']:.0f}% of the updates. Loosen the target, "
            f"train longer, or use a larger model.")
