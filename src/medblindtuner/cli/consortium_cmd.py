"""`medblindtuner consortium ...`: several hospitals train one head under a joint key.

    medblindtuner consortium run --features breast.npz --hospitals 3
    medblindtuner consortium run --dataset breastmnist --hospitals 3 --insecure-test-params

`run`: all roles in this process (n hospitals, the relay, the cloud: `consortium.run`).
`medblindtuner demo --hospitals N` runs the same job on a MedMNIST dataset with a report.

Over the service (one token per hospital, `service/consortia.py`), one role per process
(`consortium.roles`); `cloud-train` is the cloud's side by hand: the service's own worker
runs it once hospital 0 starts the training (`POST /consortia/{id}/start`,
`ConsortiumClient.start_training`; docs/design.md, "The service's side"):

    medblindtuner consortium create   --service URL --hospitals 3 --out members/
    medblindtuner consortium settings --member members/hospital-0.json --state h0/ --features f0.npz
    medblindtuner consortium keys     --member members/hospital-0.json --state h0/
    medblindtuner consortium train    --member members/hospital-0.json --state h0/ --out m0.npy
    medblindtuner consortium start    --member members/hospital-0.json --state h0/
    medblindtuner consortium status   --member members/hospital-1.json
    medblindtuner consortium refresh  --member members/hospital-0.json --state h0/
    medblindtuner consortium bundle   --data-dir cloud/ --consortium ID --plan plan.json --out b/
    medblindtuner consortium cloud-train --data-dir cloud/ --consortium ID --plan plan.json ...

`keys`, `train`, `refresh` and `start` take the plan, rows, offsets and counts `settings` saved
in the state folder unless they are given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.he.params import HOSPITAL, REFRESH_MODES

app = typer.Typer(name="consortium", no_args_is_help=True,
                  help="Several hospitals train one model under a joint (threshold) key: no "
                       "single party can decrypt.")

HospitalsOpt = Annotated[int, typer.Option(
    min=2, max=16, help="Hospitals in the consortium (n-of-n: all are needed).")]
RefreshOpt = Annotated[str, typer.Option(
    help=f"{' | '.join(REFRESH_MODES)}: hospital = every refresh through all members (runs "
         "at 128 bits); bootstrap = joint bootstrapping keys (insecure ring only).")]
InsecureOpt = Annotated[bool, typer.Option(
    help="Tiny INSECURE ring: shows the mechanics in minutes, no security.")]


def load_features(features: Path | None, dataset: str | None, data_dir: Path | None,
                  backbone: str, limit: int | None, synthetic: bool = False,
                  weights: str | None = None):
    """A FeatureSet from a .npz, a MedMNIST dataset (features extracted, cached) or
    synthetic blobs; exactly one source."""
    from medblindtuner.consortium.job import synthetic_features
    from medblindtuner.features.extract import FeatureSet

    if sum([features is not None, dataset is not None, synthetic]) != 1:
        raise typer.BadParameter("give exactly one of --features, --dataset, --synthetic")
    if synthetic:
        return synthetic_features()
    if features is not None:
        try:
            return FeatureSet.load(features)
        except (OSError, KeyError, ValueError) as exc:
            raise MedBlindTunerError(f"{features}: not a readable feature set ({exc})") from exc
    from medblindtuner.data import load_medmnist
    from medblindtuner.features import extract_features

    data = load_medmnist(dataset, data_dir=data_dir)
    if limit:
        data = data.subset(limit)
    return extract_features(data, backbone=backbone, weights=weights)


def run_and_print(features, hospitals: int, refresh: str, insecure: bool,
                  workdir: Path | None, pca: int | None, epochs: int | None,
                  weight_decay: float | None, out: Path | None) -> dict:
    """Run the job, print its summary, write the report JSON (`out`); returns the report."""
    from medblindtuner.consortium.job import run_job, summary_lines

    console = Console()
    if insecure:
        console.print("[bold red]INSECURE test parameters: the mechanics only, no "
                      "security.[/]")
    try:
        _result, report = run_job(features, hospitals, refresh, insecure, workdir, pca,
                                  epochs, weight_decay, log=console.print)
    except ValueError as exc:  # bad shapes or sizes of the given data
        raise MedBlindTunerError(str(exc)) from exc
    for line in summary_lines(report):
        console.print(line, soft_wrap=True, markup=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float))
        console.print(f"report: {out}")
    return report


@app.command("run")
def run(
    features: Annotated[Path | None, typer.Option(
        help="A FeatureSet .npz (medblindtuner features --out).")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="MedMNIST flag or .npz path (features extracted first).")] = None,
    synthetic: Annotated[bool, typer.Option(help="Gaussian blobs, 16 dims.")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="Folder with <flag>.npz.")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone for --dataset.")] = "auto",
    limit: Annotated[int | None, typer.Option(help="First N images per split.")] = None,
    hospitals: HospitalsOpt = 3,
    pca: Annotated[int | None, typer.Option(
        help="PCA width from the pooled covariance (default: chosen in the hospitals' "
             "validation rounds; 0 keeps every feature).")] = None,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Maximum epochs (default: the time allowance's; judges stop early).")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        help="L2 weight decay (default: chosen in the hospitals' validation rounds).")] = None,
    refresh: RefreshOpt = HOSPITAL,
    workdir: Annotated[Path | None, typer.Option(
        help="Checkpoints, members' ledgers, refresh journal (default: a temp folder).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
    insecure_test_params: InsecureOpt = False,
) -> None:
    """Split the data among the hospitals, agree settings, make joint keys, train encrypted
    on the union, decrypt with every hospital's share; print who took part and the scores."""
    if refresh not in REFRESH_MODES:
        raise typer.BadParameter(f"choose one of {', '.join(REFRESH_MODES)}",
                                 param_hint="--refresh")
    data = load_features(features, dataset, data_dir, backbone, limit, synthetic)
    run_and_print(data, hospitals, refresh, insecure_test_params, workdir, pca, epochs,
                  weight_decay, out)


# ---- one role per process, over the service (`consortium.roles`) -----------------------------
PlanOpt = Annotated[Path, typer.Option(help="The agreed public plan (TrainingPlan JSON).")]
AgreedPlanOpt = Annotated[Path | None, typer.Option(
    help="The agreed public plan (default: the one `settings` saved in --state).")]
MemberOpt = Annotated[Path, typer.Option(help="This hospital's member file (from `create`).")]
StateOpt = Annotated[Path, typer.Option(
    help="This hospital's own folder: sealing key, roster, secret share, refresh ledger.")]
TimeoutOpt = Annotated[float, typer.Option(min=1, help="Seconds to wait for the others.")]


@app.command("create")
def create(
    service: Annotated[str, typer.Option(help="The service's URL.")],
    hospitals: HospitalsOpt = 3,
    out: Annotated[Path, typer.Option(help="Folder for the member files.")] = Path("members"),
) -> None:
    """Form a consortium on the service: one member file per hospital (its token; hand each
    to its hospital only)."""
    from medblindtuner.consortium import roles

    for path in roles.create(service, hospitals, out):
        Console().print(f"member file: {path}", soft_wrap=True, markup=False)


@app.command("settings")
def settings(
    member: MemberOpt, state: StateOpt,
    features: Annotated[Path, typer.Option(
        help="This hospital's own FeatureSet .npz (train and val splits; never leaves it).")],
    pca: Annotated[int | None, typer.Option(
        help="PCA width (default: chosen in the validation rounds; 0 keeps every feature).")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(
        help="L2 weight decay (default: chosen in the validation rounds).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="At most this many epochs.")] = None,
    insecure_test_params: InsecureOpt = False, timeout: TimeoutOpt = 600.0,
) -> None:
    """This hospital's side of the settings rounds (secure aggregation over the service);
    writes the agreed plan (plan.json), its scaled rows (rows.npz) and their place in the
    union (ownership.json) to its state folder, where `keys`, `train` and `start` find them.
    Killed midway: run the same command again."""
    from medblindtuner.consortium import roles
    from medblindtuner.consortium.run import HospitalShard

    data = load_features(features, None, None, "auto", None)
    shard = HospitalShard(*data.splits["train"], *data.splits["val"])
    agreed = roles.settings(member, state, shard, data.n_classes, insecure_test_params, pca,
                            weight_decay, epochs, timeout)
    why = {k: v for k, v in agreed.why.items() if k != "val_loss"}
    Console().print(f"agreed {json.dumps(why, default=str)}; plan, rows, ownership: {state}",
                    soft_wrap=True, markup=False)


@app.command("keys")
def keys(member: MemberOpt, state: StateOpt, plan: AgreedPlanOpt = None,
         insecure_test_params: InsecureOpt = False, timeout: TimeoutOpt = 600.0) -> None:
    """This hospital's roster and key rounds; prints the roster's fingerprints (compare them
    with the other hospitals out of band). Killed midway: run the same command again, it goes
    on with the same share."""
    from medblindtuner.consortium import roles

    made = roles.keys(member, state, roles.load_plan(plan or state / roles.PLAN),
                      insecure_test_params, timeout)
    console = Console()
    console.print(f"hospital {made['index']}: joint key {made['joint_tag']}", markup=False)
    for index, fingerprint in enumerate(made["fingerprints"]):
        console.print(f"  roster hospital {index}: {fingerprint}", markup=False)


@app.command("refresh")
def refresh(member: MemberOpt, state: StateOpt, plan: AgreedPlanOpt = None,
            count: Annotated[int, typer.Option(min=1, help="Refreshes to answer.")] = 1,
            insecure_test_params: InsecureOpt = False, timeout: TimeoutOpt = 600.0) -> None:
    """Answer the cloud's next joint refreshes (this hospital's ledger decides)."""
    from medblindtuner.consortium import roles

    done = roles.refresh(member, state, roles.load_plan(plan or state / roles.PLAN),
                         insecure_test_params, count, timeout)
    Console().print(f"answered {done} joint refreshes", markup=False)


@app.command("bundle")
def bundle(
    data_dir: Annotated[Path, typer.Option(help="The service's data folder.")],
    consortium: Annotated[str, typer.Option(help="The consortium id.")],
    plan: PlanOpt,
    out: Annotated[Path, typer.Option(help="Folder for the joint public bundle.")],
    db_url: Annotated[str | None, typer.Option(help="The service's DB URL.")] = None,
    insecure_test_params: InsecureOpt = False, timeout: TimeoutOpt = 600.0,
) -> None:
    """The cloud operator's: the joint public bundle from the rounds in the service's store."""
    from medblindtuner.consortium import roles

    manifest = roles.bundle(data_dir, consortium, roles.load_plan(plan), insecure_test_params,
                            out, db_url, timeout)
    Console().print(f"joint public bundle: {out} ({len(manifest['files'])} files)",
                    markup=False)


@app.command("train")
def train(
    member: MemberOpt, state: StateOpt,
    out: Annotated[Path, typer.Option(help="Where to save the decrypted model (.npy).")],
    plan: AgreedPlanOpt = None,
    rows: Annotated[Path | None, typer.Option(
        help="This hospital's rows as agreed (.npz: x_train, y_train, x_val, y_val; "
             "default: `settings`').")] = None,
    train_offset: Annotated[int | None, typer.Option(
        min=0, help="Its first training row in the union (default: `settings`').")] = None,
    val_offset: Annotated[int | None, typer.Option(min=0, help="Its first validation row.")
                          ] = None,
    n_train: Annotated[int | None, typer.Option(min=1, help="The union's training rows.")
                       ] = None,
    n_val: Annotated[int | None, typer.Option(min=1, help="The union's validation rows.")
                     ] = None,
    insecure_test_params: InsecureOpt = False, timeout: TimeoutOpt = 600.0,
) -> None:
    """This hospital's side of the training: its rows under the joint key, every refresh
    and epoch the cloud asks (its ledger, its judge), then the model its judge chose. What
    is not given comes from `settings`' outputs in --state. Killed midway: run the same
    command again, it posts what it kept and goes on."""
    from medblindtuner.consortium import roles

    given = (rows, train_offset, val_offset, n_train, n_val)
    if any(v is None for v in given):
        if any(v is not None for v in given):
            raise typer.BadParameter("give all of --rows, --train-offset, --val-offset, "
                                     "--n-train, --n-val, or none (from --state)")
        agreed = roles.agreed_inputs(state)
        rows, (train_offset, val_offset), (n_train, n_val) = (
            agreed["rows"], agreed["offsets"], agreed["counts"])
    done = roles.train(member, state, roles.load_plan(plan or state / roles.PLAN),
                       insecure_test_params, rows, (train_offset, val_offset),
                       (n_train, n_val), out, timeout)
    Console().print(f"best epoch {done['best_epoch']}, {done['refreshes']} joint refreshes; "
                    f"model: {out}", markup=False)


@app.command("cloud-train")
def cloud_train(
    data_dir: Annotated[Path, typer.Option(help="The service's data folder.")],
    consortium: Annotated[str, typer.Option(help="The consortium id.")],
    plan: PlanOpt,
    n_train: Annotated[int, typer.Option(min=1, help="The union's training rows.")],
    n_val: Annotated[int, typer.Option(min=1, help="The union's validation rows.")],
    workdir: Annotated[Path, typer.Option(help="Checkpoints and the refresh journal.")],
    db_url: Annotated[str | None, typer.Option(help="The service's DB URL.")] = None,
    insecure_test_params: InsecureOpt = False, timeout: TimeoutOpt = 600.0,
) -> None:
    """The cloud operator's: train the consortium's union from the service's store."""
    from medblindtuner.consortium import roles

    done = roles.cloud_train(data_dir, consortium, roles.load_plan(plan),
                             insecure_test_params, (n_train, n_val), workdir, db_url, timeout)
    Console().print(f"trained {done['epochs']} epochs ({done['steps']} steps), best epoch "
                    f"{done['best_epoch']}", markup=False)


def _training_job(call, what: str) -> dict:  # noqa: ANN001 - a ConsortiumClient method
    """The service's answer, its refusal as one `error:` line."""
    from medblindtuner.hospital.client import ServiceError

    try:
        return call()
    except ServiceError as exc:
        raise MedBlindTunerError(f"{what}: {exc}") from exc


def _print_job(job: dict | None) -> None:
    Console().print("training: not started" if job is None else f"training: {job['detail']}",
                    soft_wrap=True, markup=False)


@app.command("start")
def start(
    member: MemberOpt, plan: AgreedPlanOpt = None,
    n_train: Annotated[int | None, typer.Option(min=1, help="The union's training rows.")
                       ] = None,
    n_val: Annotated[int | None, typer.Option(min=1, help="The union's validation rows.")
                     ] = None,
    state: Annotated[Path | None, typer.Option(
        help="Hospital 0's state folder: the plan and counts `settings` saved.")] = None,
    insecure_test_params: InsecureOpt = False, timeout: TimeoutOpt = 600.0,
) -> None:
    """Hospital 0 (the coordinator): once every hospital's rows are in (waits up to
    --timeout), the service's worker trains the consortium (`POST /consortia/{id}/start`).
    Give --plan, --n-train and --n-val, or --state (from `settings`)."""
    import time

    from medblindtuner.consortium import roles
    from medblindtuner.consortium.relayed_training import rows_topic

    if plan is None or n_train is None or n_val is None:
        if state is None:
            raise typer.BadParameter("give --plan, --n-train and --n-val, or --state")
        agreed = roles.agreed_inputs(state)
        plan = plan or agreed["plan"]
        n_train, n_val = (n_train or agreed["counts"][0], n_val or agreed["counts"][1])

    client = roles.client_of(member)
    deadline = time.monotonic() + timeout
    missing = list(range(client.n_hospitals))
    while missing and time.monotonic() < deadline:
        missing = [i for i in missing if str(i) not in _training_job(
            lambda i=i: client.round_listing(rows_topic(i), 1.0), "rows")["posted"]]
    _print_job(_training_job(lambda: client.start_training(
        roles.load_plan(plan).to_dict(), n_train, n_val, insecure_test_params), "start"))


@app.command("status")
def status(member: MemberOpt) -> None:
    """The consortium's training as the service shows it to this hospital (queued /
    training / paused: waiting for hospitals ... / done / failed)."""
    from medblindtuner.consortium import roles

    client = roles.client_of(member)
    _print_job(_training_job(client.status, "status").get("job"))
