"""Training options shared by every command that trains (declared once).

Every setting defaults to "derive it from the data" (`hospital.recipe`); a value given here
is kept as given, and refused with a clear error if it fails the range check.
"""

from __future__ import annotations

from typing import Annotated

import typer

from medblindtuner.hospital.budget import TIME_ALLOWANCE_HOURS

PcaOpt = Annotated[int | None, typer.Option(
    "--pca", help="PCA dimensions (default: chosen on validation; 0: no PCA).")]
LrOpt = Annotated[float | None, typer.Option(
    "--lr", help="Learning rate (default: 0.5 / the loss's curvature bound).")]
MomentumOpt = Annotated[float | None, typer.Option(
    help="Nesterov momentum (default: from the conditioning, at most 0.9).")]
WeightDecayOpt = Annotated[float | None, typer.Option(
    help="L2 weight decay (default: the tuned probe's penalty).")]
EpochsOpt = Annotated[int | None, typer.Option(
    help="Maximum epochs (default: until the validation loss stops improving, within the "
         "time allowance).")]
TimeAllowanceOpt = Annotated[float, typer.Option(
    "--time-allowance", help="Hours of encrypted training the derived epochs and width may "
    f"plan for, at the measured costs (default {TIME_ALLOWANCE_HOURS:g}: 9 minutes).")]
BatchOpt = Annotated[int | None, typer.Option(
    help="Mini-batch size, capped by one ciphertext (default: one full ciphertext).")]
PatienceOpt = Annotated[int, typer.Option(help="Early-stopping patience in epochs.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the batch schedule.")]
RefreshOpt = Annotated[str | None, typer.Option(
    "--refresh", help="Who refreshes the cloud's ciphertexts: 'hospital' (the key holder, "
    "interactively: no bootstrapping keys, ring 2^15) or 'bootstrap' (the cloud alone). "
    "Default: 'hospital' (docs/results.md, 'Refresh by the key holder').")]


def refresh_params(refresh: str | None, insecure: bool):
    """The CKKS parameter set of the chosen refresh mode (`he.params.default_refresh` when
    none is given; ParameterError on an unknown one)."""
    from ..he.params import default_refresh, params_for_mode

    return params_for_mode(refresh or default_refresh(), insecure)


def overrides(pca: int | None, lr: float | None, momentum: float | None,
              weight_decay: float | None, epochs: int | None, batch_size: int | None,
              patience: int = 4, seed: int = 0, time_allowance: float | None = None):
    """The user's settings as `hospital.recipe.Overrides` (None: derived)."""
    from ..hospital.recipe import Overrides

    return Overrides(pca_dims=pca, learning_rate=lr, momentum=momentum,
                     weight_decay=weight_decay, epochs=epochs, batch_size=batch_size,
                     patience=patience, seed=seed,
                     **({} if time_allowance is None else {"time_allowance_h": time_allowance}))
