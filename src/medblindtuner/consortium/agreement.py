"""The settings a consortium agrees on, round by round, without pooling plaintext.

Every round is a secure aggregation (`settings.SecureAggregator`): each hospital masks its
sums and seals them to every other hospital; each opens the others', adds, and all must get
the same sums. Rounds, in order (each label once per job):

1. `counts`, `sum`, `outer`, `class_sum`: row counts, feature sums, outer products, each
   class's feature sum and count (the union's mean, covariance and class means).
2. `val_loss` (when the width or the weight decay is not given): each hospital's validation
   log-loss sums of the one-Newton-step stand-ins (`consortium.choice`), one per candidate.
3. `val_ties` (when more than one width is left): sums and squares of the paired differences
   to the best candidate; the widest tied width wins, with its best decay.
4. `scaled_outer`: the scaled, clipped rows' second moments at the chosen width, from which
   every hospital computes the same preconditioner p_j, step size and momentum
   (`settings.agreed_config`) and the hospitals encrypt x_grad as x p.
5. `interval`: the activation interval. No hospital may train on the union in the clear (the
   single hospital's range check runs the plaintext twin), so each hospital trains the exact
   head on its own rows with the agreed settings and contributes a one-hot vector of the
   smallest rung of the recipe's ladder that holds its logits with `LOGIT_HEADROOM`; the
   widest rung any hospital needs is taken (fewer rows separate more easily: a hospital alone
   reaches larger logits than the union, so this errs wide). Beyond the ladder's top, the
   weight decay is raised until the optimum's logits are bounded by construction
   (`hospital.recipe.logit_bounding_weight_decay`, rows of norm <= 1 plus the bias).
"""

from __future__ import annotations

from collections.abc import Sequence
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

from .choice import (
    DECAY_GRID,
    Candidate,
    best_per_width,
    candidate_widths,
    losses_by_candidate,
    newton_models,
    paired_sums,
    widest_tied,
)
from .sealing import Roster, SealedMailbox, open_share, seal_share
from .settings import (
    PooledStatistics,
    SecureAggregator,
    agreed_config,
    local_statistics,
    pool,
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


def secure_round(contributions: Sequence[dict[str, np.ndarray]], roster: Roster,
                 sealing_keys, mailbox: SealedMailbox) -> list[dict[str, np.ndarray]]:
    """One aggregation round among all hospitals (hospital i gives `contributions[i]`):
    masked, sealed to every other hospital, opened. Returns the n masked contributions in
    hospital order (`unmask_sum` adds them); refuses if a hospital misses any."""
    n = len(contributions)
    masked = []
    for index, (mine, key) in enumerate(zip(contributions, sealing_keys, strict=True)):
        aggregator = SecureAggregator(key, roster, index)
        masked.append({name: aggregator.masked(name, values) for name, values in mine.items()})
        for name, values in masked[-1].items():
            for other in range(n):
                if other != index:
                    mailbox.post(seal_share(key, roster, index, other, f"aggregate-{name}",
                                            values.astype("<u8").tobytes()))
    seen = None
    for index, key in enumerate(sealing_keys):
        received: dict[int, dict[str, np.ndarray]] = {index: masked[index]}
        for name in masked[index]:
            for envelope in mailbox.fetch(roster.job_id, f"aggregate-{name}", index):
                sender, data = open_share(key, roster, index, f"aggregate-{name}", envelope)
                received.setdefault(sender, {})[name] = np.frombuffer(data, dtype="<u8")
        if sorted(received) != list(range(n)) or any(len(r) != len(masked[index])
                                                     for r in received.values()):
            raise SettingsError(f"hospital {index} is missing masked sums: the settings wait "
                                "for every hospital")
        ordered = [received[i] for i in range(n)]
        if seen is not None and any(not np.array_equal(a[k], b[k]) for a, b in
                                    zip(seen, ordered, strict=True) for k in a):
            raise SettingsError("the hospitals received different sums: settings not agreed")
        seen = ordered
    return seen


def agree_settings(shards, roster: Roster, sealing_keys, n_classes: int, params: CkksParams,
                   pca_dims: int | None, weight_decay: float | None, epochs: int | None,
                   mailbox: SealedMailbox) -> AgreedSettings:
    """The rounds of the module docstring. `pca_dims`: None = chosen, 0 = every feature;
    `weight_decay`: None = chosen."""
    def summed(label: str, values: Sequence[np.ndarray]) -> np.ndarray:
        rows = secure_round([{label: v} for v in values], roster, sealing_keys, mailbox)
        return unmask_sum([r[label] for r in rows], np.shape(values[0]))

    dim = shards[0].x_train.shape[1]
    pooled = pool(secure_round([local_statistics(s.x_train, s.y_train, len(s.y_val),
                                                 n_classes) for s in shards],
                               roster, sealing_keys, mailbox), dim, n_classes)
    widths = ([None if pca_dims == 0 else pca_dims] if pca_dims is not None else
              candidate_widths(dim, pooled.n_train, pooled.n_val, n_classes, params.slots,
                               params.refresh))
    decays = [weight_decay] if weight_decay is not None else list(DECAY_GRID)
    scalers = {k: pooled.scaler(k) for k in widths}
    models = {Candidate(k, wd): w for k in widths for wd, w in zip(decays, newton_models(
        scalers[k], pooled.n_train, pooled.feature_sum, pooled.outer_sum, pooled.class_sums,
        n_classes, decays), strict=True)}
    candidates = list(models)
    chosen, why = candidates[0], {"candidates": len(candidates)}
    if len(candidates) > 1:
        losses = [losses_by_candidate(scalers, models, s.x_val, s.y_val, n_classes)
                  for s in shards]
        sums = summed("val_loss", [np.array([mine[c].sum() for c in candidates])
                                   for mine in losses])
        finalists = list(best_per_width(candidates, sums).values())
        leader = min(finalists, key=lambda c: sums[candidates.index(c)])
        chosen = leader
        if len(finalists) > 1:
            pairs = summed("val_ties", [paired_sums(mine, finalists, leader)
                                        for mine in losses])
            chosen = widest_tied(finalists, pairs, pooled.n_val)
        why["val_loss"] = {f"{c.width}/{c.weight_decay:.3g}": round(float(t) / pooled.n_val, 5)
                           for c, t in zip(candidates, sums, strict=True)}
    why.update(width=chosen.width, weight_decay=chosen.weight_decay)
    scaler = scalers[chosen.width]
    scaled = [scaler.augment(s.x_train) for s in shards]
    moment = summed("scaled_outer", [z.T @ z for z in scaled]) / pooled.n_train
    def config_at(wd: float):
        config = agreed_config(moment, pooled.n_train, pooled.n_val, params.slots, n_classes,
                               wd, params.refresh)
        return config if epochs is None else replace(config, epochs=epochs)

    config = config_at(chosen.weight_decay)
    ladder = SIGMOID_BOUNDS if n_classes == 2 else EXP_BOUNDS + SATURATED_EXP_BOUNDS
    rungs = summed("interval", [_rung_needed(z, s, scaler, config, n_classes, params, ladder)
                                for z, s in zip(scaled, shards, strict=True)])
    if rungs[-1] > 0:  # a hospital's logits outgrow the ladder: bound them by the prior
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
    return AgreedSettings(pooled, scaler, plan, p, why)


def _rung_needed(z_train: np.ndarray, shard, scaler: FeatureScaler, config, n_classes: int,
                 params: CkksParams, ladder: Sequence[float]) -> np.ndarray:
    """One hospital: one-hot over the ladder plus one (beyond the top) of the smallest rung
    holding its own exact head's logits (agreed settings, its own rows) with headroom."""
    own = train_head(z_train, shard.y_train, scaler.augment(shard.x_val), shard.y_val,
                     n_classes, config, layout=PackingLayout(params.slots, z_train.shape[1]))
    needed = own.max_abs_logit / LOGIT_HEADROOM
    index = next((i for i, b in enumerate(ladder) if b >= needed), len(ladder))
    return np.eye(len(ladder) + 1)[index]
