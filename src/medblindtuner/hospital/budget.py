"""What an encrypted run costs, and how many epochs a time allowance buys (hospital side).

The recipe (`hospital.recipe`) sizes the run from the data: batches of whole data
ciphertexts, as many epochs as the validation loss keeps improving for in the plaintext twin
(the judge's early stop ends the encrypted run at the same epoch), but never more than
`TIME_ALLOWANCE_HOURS` (the user's `--time-allowance`) of encrypted training at the measured
cost per chunk and per step. The costs are estimates from benchmarks/scale.py (production
128-bit, one process; docs/results.md), used to compare widths and to cap epochs, never as
promises.
"""

from __future__ import annotations

from medblindtuner.he.packing import PackingLayout, next_power_of_two
from medblindtuner.he.params import BOOTSTRAP, HOSPITAL
from medblindtuner.training.plain import make_batches
from medblindtuner.training.plan import (
    compact_softmax_group,
    compact_softmax_period,
    denominator_group_chunks,
    max_batch_size,
)

# Default encrypted training time the recipe may plan for: the main job in minutes (a
# 5,000-image binary set end to end within 15 minutes, docs/results.md); the user may give more.
TIME_ALLOWANCE_HOURS = 0.15
MIN_EPOCHS, MAX_EPOCHS = 2, 60
# At least 512 samples a step: at a constant step size the head wanders around its optimum by
# the gradient's noise, which halves with twice the batch (RetinaMNIST "moderate or worse" at
# PCA 1023: test ACC 74.25-75.5 % from epoch to epoch at 256, the early stop's pick -1.25
# points against the probe; -0.75 at 512; docs/results.md). Epochs come from the early stop,
# so fewer steps an epoch no longer cut the steps a run takes (the reason 256 was kept).
MIN_BATCH = 512
MAX_STEPS_PER_EPOCH = 15  # larger sets take bigger steps (a step's bootstraps are paid once)
# Seconds of one data ciphertext's per-chunk work, per refresh mode and head, and a step's
# serial work (model update and bootstraps or refreshes, incl. the gathered logits' refresh
# and sigmoid) in units of it: benchmarks/scale.py, production, one process, quiet, N =
# 10,000, both modes and heads in one run ("Fewer rotations a chunk" in docs/results.md):
# binary PCA 63, hospital 0.228 s a chunk of 128 samples and 2.24 s serial, bootstrap 3.31 s a
# chunk of 256 and 12.24 s; 5-class PCA 31, hospital 5.06 s a chunk of 256 and 1.2 s, bootstrap
# 20.0 s a chunk of 512 and 37.1 s. Hospital binary uses the end-to-end figure of a run over
# the service instead (`bash run.sh demo`, BreastMNIST PCA 511, 17-18 chunks a step, 32
# samples' logits in place of 8: 26 s an epoch of 41 chunk passes and 2 steps, 0.43 s a pass,
# the refresh relay, journal and checkpoints included). Hospital softmax was re-measured
# (2026-12-06, `benchmarks/scale.py --heads softmax --sizes 2000 --steps 3 --refresh
# hospital`, three runs: 6.20, 5.99, 6.14 s a chunk, 1.45-1.70 s serial): 6.1 s and 0.26;
# they predict the 7-class stress set's 342 s an epoch within 1 % and RetinaMNIST's 51 s
# within 7 % (docs/results.md), where 5.06 s had planned the 7-class epoch 28 % short. Used to
# compare widths and to cap epochs, never promised.
CHUNK_SECONDS = {(BOOTSTRAP, "binary"): 3.31, (BOOTSTRAP, "softmax"): 20.0,
                 (HOSPITAL, "binary"): 0.43, (HOSPITAL, "softmax"): 6.1}
STEP_COST_IN_CHUNKS = {(BOOTSTRAP, "binary"): 3.7, (BOOTSTRAP, "softmax"): 1.85,
                       (HOSPITAL, "binary"): 9.8, (HOSPITAL, "softmax"): 0.26}
# A softmax chunk's work is per class diagonal (an exponential, products and rotations each),
# so the 5-class figures above scale with c / 5: seconds a step of 2 chunks at PCA 31, hospital
# mode, quiet (`medblindtuner train-encrypted --pca 31 --epochs 1 --fixed-epochs --json`):
# 3 classes 9.37, 5 classes 14.1 (RetinaMNIST), 10 classes 26.63 (docs/results.md).
SOFTMAX_COST_CLASSES = 5
# A softmax chunk with the saturating exponential (degree 27 instead of 13, logits beyond
# [-7, 7]): 6.88 / 5.99 s and 7.23 / 6.14 s a chunk against the plain exp in two runs
# (`python benchmarks/scale.py --heads softmax softmax-wide --sizes 2000 --steps 3 --refresh
# hospital`, quiet; docs/results.md).
SATURATED_EXP_CHUNK_COST = 1.16
# One exponential a step (refresh mode "hospital", `TrainingPlan.compact_softmax`): a chunk's
# part costs 0.36 of a chunk with its own exponentials and each gathered group's serial part
# (its two refreshes, the exponential and the inverse; the model's refresh) 0.43 of one,
# validation chunks alike (`TrainingPlan.validation_group`). Measured in one run, quiet
# (`python benchmarks/scale.py --heads softmax softmax-chunkwise --sizes 2000 --steps 3
# --refresh hospital`, 5 classes, PCA 31, 2 chunks a step): 2.39 and 2.83 s against a 6.58 s
# chunk; docs/results.md.
COMPACT_SOFTMAX_CHUNK_COST = 0.36
COMPACT_SOFTMAX_STEP_COST = 0.43
# Each further softmax denominator group of a step: bootstrap mode one more bootstrap at the
# shared slot count (15.6 s at 2048 slots, benchmarks/bootstrap_memory.py, against a 20.0 s
# chunk); refresh mode one more refresh round trip and inverse (~0.5 s against ~5-6 s).
EXTRA_DENOMINATOR_GROUP_IN_CHUNKS = {BOOTSTRAP: 0.78, HOSPITAL: 0.1}


def head_kind(n_classes: int) -> str:
    return "binary" if n_classes == 2 else "softmax"


def derived_batch_size(n_samples: int, layout: PackingLayout, n_classes: int) -> int:
    """Whole ciphertexts: at least MIN_BATCH samples, at most MAX_STEPS_PER_EPOCH steps an
    epoch, no more than a step takes (`plan.max_batch_size`) or the data holds."""
    per_ct = layout.samples_per_ct
    wanted = max(-(-MIN_BATCH // per_ct), -(-n_samples // (per_ct * MAX_STEPS_PER_EPOCH)))
    chunks = min(wanted, max_batch_size(layout, n_classes) // per_ct, -(-n_samples // per_ct))
    return chunks * per_ct


def batch_chunks(n_train: int, layout: PackingLayout, n_classes: int) -> list[int]:
    """Data ciphertexts of each batch under the derived batch rule."""
    batches = make_batches(n_train, derived_batch_size(n_train, layout, n_classes), 0)
    return [-(-len(b) // layout.samples_per_ct) for b in batches]


def chunks_per_step(n_train: int, layout: PackingLayout, n_classes: int) -> int:
    """Data ciphertexts in the largest batch under the derived batch rule."""
    return max(batch_chunks(n_train, layout, n_classes))


def epoch_work(n_train: int, n_val: int, layout: PackingLayout, n_classes: int,
               refresh: str = BOOTSTRAP, saturated: bool = False) -> float:
    """One epoch's encrypted work in data-ciphertext passes (of a 5-class chunk for softmax:
    a chunk of c classes counts c / `SOFTMAX_COST_CLASSES`, and `SATURATED_EXP_CHUNK_COST`
    times that with the saturating exponential): every training and validation chunk, plus
    each step's serial work (`STEP_COST_IN_CHUNKS`) and softmax's further denominator
    groups; with one exponential a step (`COMPACT_SOFTMAX_CHUNK_COST`) its training and
    validation chunks and gathered groups at their own cost."""
    chunks = batch_chunks(n_train, layout, n_classes)
    validation = -(-n_val // layout.samples_per_ct)
    passes = sum(chunks) + validation
    serial = len(chunks) * STEP_COST_IN_CHUNKS[refresh, head_kind(n_classes)]
    group = compact_softmax_group(layout, n_classes, max(chunks))
    if n_classes > 2 and refresh == HOSPITAL and group:
        width = next_power_of_two(n_classes)
        checks = layout.block // (width * compact_softmax_period(layout, n_classes, max(chunks)))
        groups = sum(-(-c // group) for c in chunks) + -(-validation // checks)
        return float(n_classes / SOFTMAX_COST_CLASSES * COMPACT_SOFTMAX_CHUNK_COST * passes
                     + groups * COMPACT_SOFTMAX_STEP_COST)
    if n_classes > 2:
        passes *= n_classes / SOFTMAX_COST_CLASSES
        passes *= SATURATED_EXP_CHUNK_COST if saturated else 1.0
        group = denominator_group_chunks(layout, max(chunks))
        serial += EXTRA_DENOMINATOR_GROUP_IN_CHUNKS[refresh] * sum(-(-c // group) - 1
                                                                   for c in chunks)
    return float(passes + serial)


def epoch_seconds(n_train: int, n_val: int, layout: PackingLayout, n_classes: int,
                  refresh: str = BOOTSTRAP, saturated: bool = False) -> float:
    """Estimated seconds of one encrypted epoch in one process (production parameters of
    refresh mode `refresh`)."""
    return (epoch_work(n_train, n_val, layout, n_classes, refresh, saturated)
            * CHUNK_SECONDS[refresh, head_kind(n_classes)])


def affordable_epochs(n_train: int, n_val: int, layout: PackingLayout, n_classes: int,
                      hours: float = TIME_ALLOWANCE_HOURS, refresh: str = BOOTSTRAP,
                      saturated: bool = False) -> int:
    """Epochs that fit `hours` of encrypted training, between MIN_EPOCHS and MAX_EPOCHS
    (`saturated`: a softmax head with the saturating exponential)."""
    fitting = int(3600.0 * hours // epoch_seconds(n_train, n_val, layout, n_classes, refresh,
                                                  saturated))
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, fitting)))


def encrypted_work(n_train: int, n_val: int, layout: PackingLayout, n_classes: int,
                   hours: float = TIME_ALLOWANCE_HOURS) -> float:
    """Work of the longest run the allowance plans at this layout (affordable epochs times
    one epoch's work), in data-ciphertext passes."""
    return affordable_epochs(n_train, n_val, layout, n_classes, hours) * epoch_work(
        n_train, n_val, layout, n_classes)
