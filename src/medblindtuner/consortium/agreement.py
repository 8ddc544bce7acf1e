"""The settings a consortium agrees on, round by round, without pooling plaintext.

Every round is a secure aggregation (`settings.SecureAggregator`): each hospital masks its
sums and seals them to every other hospital; each opens the others', adds, and all must get
the same sums. Rounds, in order (each label once per job):

1. `counts`, `sum`, `outer`, `class_sum`, `row_counts`: row counts, feature sums, outer
   products, each class's feature sum and count (the union's mean, covariance and class
   means), and each hospital's training row count (public among the hospitals: the union's
   order, hospital 0's rows first).
   The width: the widest of `PCA_CANDIDATES` the time allowance affords (as the recipe,
   wider is preferred: the probe uses every feature; the prior pays for the width).
2. `val_loss` (when the weight decay is not given): each hospital's validation log-loss sums
   of the one-Newton-step stand-ins at that width (`consortium.choice`), one per decay of
   `DECAY_GRID`; the lowest pooled loss sets the decay.
3. `scaled_outer`: the scaled, clipped rows' second moments at the chosen width, from which
   every hospital computes the same preconditioner p_j, step size and momentum
   (`settings.agreed_config`) and the hospitals encrypt x_grad as x p.
4. `interval`: the activation interval. No hospital may train on the union in the clear (the
   single hospital's range check runs the plaintext twin), so each hospital trains the exact
   head on its own rows with the agreed settings and contributes a one-hot vector of the
   smallest rung of the recipe's ladder that holds its logits with `LOGIT_HEADROOM`; the
   widest rung any hospital needs is taken (fewer rows separate more easily: a hospital alone
   reaches larger logits than the union, so this errs wide). Beyond the ladder's top, the
   weight decay is raised until the optimum's logits are bounded by construction
   (`hospital.recipe.logit_bounding_weight_decay`, rows of norm <= 1 plus the bias).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.features.preprocess import FeatureScaler
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import CkksParams
from medblindtuner.hospital.recipe import (
    EXP_BOUNDS,
    LOGIT_HEADROOM,
    SATURATED_EXP_BOUNDS,
    SIGMOID_BOUNDS,
    logit_bounding_weight_decay,
)
from medblindtuner.training.approx import ActivationPlan
from medblindtuner.training.plain import preconditioner_of_moments, train_head
from medblindtuner.training.plan import TrainingPlan

from .choice import DECAY_GRID, candidate_widths, newton_models, sample_losses
from .data import Ownership
from .sealing import Mailbox, Roster, open_share, seal_share
from .settings import (
    PooledStatistics,
    SecureAggregator,
    agreed_config,
    local_statistics,
    unmask_sum,
)


class SettingsError(MedBlindTunerError, RuntimeError):
    """The hospitals could not agree on settings (missing or differing sums)."""


@dataclass
class AgreedSettings:
    """What every hospital holds after the rounds (public among the hospitals)."""

    pooled: PooledStatistics
    scaler: FeatureScaler
    plan: TrainingPlan
    preconditioner: np.ndarray  # p_j per scaled feature column (bias included)
    why: dict = field(default_factory=dict)  # how width and decay were chosen
    # each hospital's training and validation rows (public among them): the union is
    # hospital 0's rows, then 1's, ... (`ownership`)
    train_counts: tuple[int, ...] = ()
    val_counts: tuple[int, ...] = ()

    def ownership(self, index: int) -> Ownership:
        """Where hospital `index`'s rows sit in the union."""
        return Ownership(sum(self.train_counts[:index]), self.train_counts[index],
                         sum(self.val_counts[:index]), self.val_counts[index])


Sums = dict[str, np.ndarray]
# One hospital's side of the rounds: yields its contribution to each round (label -> values),
# is sent the union's sums of that round (same labels and shapes), returns the settings.
SettingsRounds = Generator[Sums, Sums, "AgreedSettings"]


def post_masked(index: int, aggregator: SecureAggregator, key, roster: Roster,  # noqa: ANN001
                contribution: Sums, mailbox: Mailbox) -> Sums:
    """Hospital `index`: mask each value (`SecureAggregator`, a label once per job) and seal
    it to every other hospital; returns its own masked values."""
    masked = {name: aggregator.masked(name, values) for name, values in contribution.items()}
    for name, values in masked.items():
        for other in range(len(roster.public_keys)):
            if other != index:
                mailbox.post(seal_share(key, roster, index, other, f"aggregate-{name}",
                                        values.astype("<u8").tobytes()))
    return masked


def collect_sums(index: int, key, roster: Roster, contribution: Sums,  # noqa: ANN001
                 mine: Sums, mailbox: Mailbox) -> Sums:
    """Hospital `index`: open the other hospitals' masked values addressed to it, add them
    to its own (`mine`): the union's sums, shaped like `contribution`. Refuses when one is
    missing."""
    n = len(roster.public_keys)
    received: dict[int, Sums] = {index: mine}
    for name in mine:
        for envelope in mailbox.fetch(roster.job_id, f"aggregate-{name}", index):
            sender, data = open_share(key, roster, index, f"aggregate-{name}", envelope)
            received.setdefault(sender, {})[name] = np.frombuffer(data, dtype="<u8")
    if sorted(received) != list(range(n)) or any(set(r) != set(mine)
                                                 for r in received.values()):
        raise SettingsError(f"hospital {index} is missing masked sums: the settings wait for "
                            "every hospital")
    return {name: unmask_sum([received[i][name] for i in range(n)],
                             np.shape(contribution[name])) for name in mine}


def agree_settings(shards, roster: Roster, sealing_keys, n_classes: int, params: CkksParams,
                   pca_dims: int | None, weight_decay: float | None, epochs: int | None,
                   mailbox: Mailbox) -> AgreedSettings:
    """All hospitals in one process: every hospital's `hospital_settings`, round by round
    (all post, then all collect); refuses unless every hospital ends with the same plan."""
    rounds = [hospital_settings(i, s, len(shards), n_classes, params, pca_dims, weight_decay,
                                epochs) for i, s in enumerate(shards)]
    aggregators = [SecureAggregator(k, roster, i) for i, k in enumerate(sealing_keys)]
    contributions: list[Sums] = [next(r) for r in rounds]
    while True:
        masked = [post_masked(i, aggregators[i], sealing_keys[i], roster, c, mailbox)
                  for i, c in enumerate(contributions)]
        sums = [collect_sums(i, sealing_keys[i], roster, c, masked[i], mailbox)
                for i, c in enumerate(contributions)]
        steps = [_advance(r, s) for r, s in zip(rounds, sums, strict=True)]
        done = [step for step in steps if isinstance(step, AgreedSettings)]
        if not done:
            contributions = steps
            continue
        if len(done) != len(steps) or any(a.plan != done[0].plan for a in done):
            raise SettingsError("the hospitals derived different settings: not agreed")
        return done[0]


def _advance(rounds: SettingsRounds, sums: Sums) -> Sums | AgreedSettings:
    """The next round's contribution, or the settings when the rounds are over."""
    try:
        return rounds.send(sums)
    except StopIteration as stop:
        return stop.value


def hospital_settings(index: int, shard, n_hospitals: int, n_classes: int,  # noqa: ANN001
                      params: CkksParams, pca_dims: int | None, weight_decay: float | None,
                      epochs: int | None) -> SettingsRounds:
    """Hospital `index`'s side of the rounds of the module docstring (`pca_dims`: None =
    chosen, 0 = every feature; `weight_decay`: None = chosen). Every hospital makes the same
    rounds from the same sums, so all return the same settings."""
    dim = shard.x_train.shape[1]
    own_counts = np.zeros((2, n_hospitals))
    own_counts[:, index] = len(shard.y_train), len(shard.y_val)
    first = yield {**local_statistics(shard.x_train, shard.y_train, len(shard.y_val),
                                      n_classes), "row_counts": own_counts}
    pooled = PooledStatistics.of_sums(first)
    width = (None if pca_dims == 0 else pca_dims) if pca_dims is not None else (
        candidate_widths(dim, pooled.n_train, pooled.n_val, n_classes, params.slots,
                         params.refresh)[-1])
    decays = [weight_decay] if weight_decay is not None else list(DECAY_GRID)
    scaler = pooled.scaler(width)
    models = newton_models(scaler, pooled.n_train, pooled.feature_sum, pooled.outer_sum,
                           pooled.class_sums, n_classes, decays)
    chosen, why = decays[0], {"candidates": len(decays)}
    if len(decays) > 1:
        z_val = scaler.augment(shard.x_val)
        sums = (yield {"val_loss": np.array([sample_losses(w, z_val, shard.y_val, n_classes)
                                             .sum() for w in models])})["val_loss"]
        chosen = decays[int(np.argmin(sums))]
        why["val_loss"] = {f"{wd:.3g}": round(float(t) / pooled.n_val, 5)
                           for wd, t in zip(decays, sums, strict=True)}
    why.update(width=width, weight_decay=chosen)
    z = scaler.augment(shard.x_train)
    moment = (yield {"scaled_outer": z.T @ z})["scaled_outer"] / pooled.n_train

    def config_at(wd: float):
        config = agreed_config(moment, pooled.n_train, pooled.n_val, params.slots, n_classes,
                               wd, params.refresh)
        return config if epochs is None else replace(config, epochs=epochs)

    config = config_at(chosen)
    ladder = SIGMOID_BOUNDS if n_classes == 2 else EXP_BOUNDS + SATURATED_EXP_BOUNDS
    rungs = (yield {"interval": _rung_needed(z, shard, scaler, config, n_classes, params,
                                             ladder)})["interval"]
    if rungs[-1] > 0.5:  # a hospital's logits outgrow the ladder: bound them by the prior
        wd = max(config.weight_decay, logit_bounding_weight_decay(
            np.array([[1.0, scaler.bias_]]), n_classes, LOGIT_HEADROOM * ladder[-1]))
        config, why["raised_weight_decay"] = config_at(wd), wd
    bound = ladder[min(int(np.flatnonzero(rungs > 0.5)[-1]), len(ladder) - 1)]
    why["logit_bound"] = bound
    activation = (ActivationPlan(n_classes, bound) if n_classes == 2
                  else ActivationPlan.softmax_for(n_classes, bound))
    plan = TrainingPlan.create(params, np.empty((pooled.n_train, moment.shape[0])),
                               np.empty((pooled.n_val, moment.shape[0])), n_classes, config,
                               activation)
    p = preconditioner_of_moments(np.diag(moment), n_classes, config.weight_decay)
    counts = np.rint(first["row_counts"]).astype(int)
    return AgreedSettings(pooled, scaler, plan, p, why, tuple(counts[0].tolist()),
                          tuple(counts[1].tolist()))


def _rung_needed(z_train: np.ndarray, shard, scaler: FeatureScaler, config, n_classes: int,
                 params: CkksParams, ladder: Sequence[float]) -> np.ndarray:
    """One hospital: one-hot over the ladder plus one (beyond the top) of the smallest rung
    holding its own exact head's logits (agreed settings, its own rows) with headroom."""
    own = train_head(z_train, shard.y_train, scaler.augment(shard.x_val), shard.y_val,
                     n_classes, config, layout=PackingLayout(params.slots, z_train.shape[1]))
    needed = own.max_abs_logit / LOGIT_HEADROOM
    index = next((i for i, b in enumerate(ladder) if b >= needed), len(ladder))
    return np.eye(len(ladder) + 1)[index]
