"""`medblindtuner hospital ...`: the key holder's side of a cloud training job.

keygen -> encrypt -> submit -> fetch (answers the early-stopping questions, downloads the
weights) -> evaluate (decrypts locally, compares with the plaintext trainers); predict:
encrypted inference. Each command parses, calls `Hospital` / `CloudSession` and prints; the
work directory's layout is `hospital.hospital.HospitalFolder`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from ..errors import EXIT_USER_ERROR
from .options import (
    TIME_ALLOWANCE_HOURS,
    BatchOpt,
    EpochsOpt,
    LrOpt,
    MomentumOpt,
    PatienceOpt,
    PcaOpt,
    RefreshOpt,
    SeedOpt,
    TimeAllowanceOpt,
    WeightDecayOpt,
    overrides,
    refresh_params,
)

console = Console(stderr=True)
WorkDir = Annotated[Path, typer.Option(help="Hospital work directory (keys, plan, job).")]
DEFAULT_WORKDIR = Path("hospital-job")


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """One `error:` line (the message escaped: a cloud's text is no markup) and exit 2."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(' '.join(str(message).split()))}",
                  soft_wrap=True)
    raise typer.Exit(code)


def _open(workdir: Path):
    """The prepared hospital folder (`Hospital.open`), or a clear error."""
    from medblindtuner.hospital.hospital import Hospital, HospitalError

    try:
        hospital = Hospital.open(workdir, log=console.print)
    except HospitalError as exc:
        _fail(str(exc))
    if hospital.data is None:
        _fail(f"{hospital.folder.prepared} not found: run `medblindtuner hospital keygen` "
              "first")
    return hospital


def _raw_features(path: Path, split: str | None) -> np.ndarray:
    """Rows to score from a FeatureSet file (one split, or all) or an .npz with `x`."""
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z.files:
            for key in ("x", "features"):
                if key in z.files:
                    return np.asarray(z[key], dtype=np.float64)
            _fail(f"{path}: expected a FeatureSet file or an .npz with an 'x' array")
    from medblindtuner.features.extract import FeatureSet

    feature_set = FeatureSet.load(path)
    if split is not None:
        if split not in feature_set.splits:
            _fail(f"{path} has no split {split!r} ({sorted(feature_set.splits)})")
        return feature_set.splits[split][0].astype(np.float64)
    return np.vstack([x for x, _ in feature_set.splits.values()]).astype(np.float64)


def _session(workdir: Path, progress: bool = True):
    """The job recorded in the folder's job.json (`CloudSession.resume`)."""
    from medblindtuner.hospital.hospital import Hospital
    from medblindtuner.hospital.session import CloudSession

    return CloudSession.resume(Hospital.open(workdir, log=console.print), progress=progress)


app = typer.Typer(name="hospital", help="Hospital side: keys, encryption, submit, fetch, evaluate.",
                  no_args_is_help=True)

@app.command("keygen")
def keygen(
    features: Annotated[Path, typer.Option(help="Feature set (.npz from `features`).")],
    workdir: WorkDir = DEFAULT_WORKDIR,
    pca: PcaOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    momentum: MomentumOpt = None,
    weight_decay: WeightDecayOpt = None,
    batch_size: BatchOpt = None,
    patience: PatienceOpt = 4,
    time_allowance: TimeAllowanceOpt = TIME_ALLOWANCE_HOURS,
    seed: SeedOpt = 0,
    insecure_test_params: Annotated[
        bool, typer.Option(help="Tiny NOT-secure ring (tests/demos only).")
    ] = False,
    refresh: RefreshOpt = None,
) -> None:
    """Plan the training, check approximation ranges, generate keys, write the bundle."""
    from medblindtuner.features.extract import FeatureSet
    from medblindtuner.he.keys import bundle_size_bytes
    from medblindtuner.hospital.hospital import Hospital
    from medblindtuner.hospital.recipe import RecipeError
    from medblindtuner.training.approx import RangeError

    given = overrides(pca, lr, momentum, weight_decay, epochs, batch_size, patience, seed,
                      time_allowance=time_allowance)
    try:
        mode = refresh_params(refresh, insecure_test_params).refresh
    except ValueError as exc:
        _fail(str(exc))
    hospital = Hospital(workdir, insecure_test_params=insecure_test_params, refresh=mode,
                        log=console.print)
    console.print(f"refresh mode: {mode}")
    console.print("training settings (derived from train/validation unless given):")
    try:
        hospital.prepare(FeatureSet.load(features), given)
    except (RangeError, RecipeError) as exc:
        _fail(str(exc))
    if (hint := hospital.plan.batch_hint()) is not None:
        console.print(f"[yellow]note:[/yellow] {hint}")
    console.print(f"generating {hospital.params.name} keys (ring {hospital.params.ring_dim}); "
                  "production keys take minutes and several GB of RAM ...")
    hospital.generate_keys()
    bundle = hospital.folder.public_bundle
    console.print(f"public bundle: {bundle} ({bundle_size_bytes(bundle) / 2**20:.1f} MiB); "
                  f"secret key stays in {hospital.folder.local}")

@app.command("encrypt")
def encrypt(workdir: WorkDir = DEFAULT_WORKDIR) -> None:
    """Encrypt the training and validation batches (once; reused every epoch)."""
    from tqdm import tqdm

    hospital = _open(workdir)
    plan = hospital.plan
    with tqdm(total=plan.n_chunks, desc="encrypt chunks", unit="chunk") as bar:
        path = hospital.encrypt_dataset(progress=bar.update)
    console.print(f"encrypted dataset: {path}")

@app.command("submit")
def submit(
    url: Annotated[str, typer.Option(help="Service base URL.")] = "http://127.0.0.1:8000",
    workdir: WorkDir = DEFAULT_WORKDIR,
) -> None:
    """Create a job, upload bundle + encrypted dataset (resumable), start training."""
    from medblindtuner.hospital.client import ServiceError
    from medblindtuner.hospital.hospital import Hospital
    from medblindtuner.hospital.session import CloudSession

    hospital = Hospital.open(workdir, log=console.print)
    try:
        if CloudSession.has_job(hospital):  # resume an interrupted submit
            session = CloudSession.resume(hospital)
            console.print(f"resuming job {session.job_id}")
        else:
            session = CloudSession.create(hospital, url)
        session.submit()
    except ServiceError as exc:
        _fail(str(exc))
    console.print(f"job {session.job_id} started; `medblindtuner hospital fetch` answers "
                  "the early-stopping questions and downloads the result")

@app.command("status")
def status(
    workdir: WorkDir = DEFAULT_WORKDIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the job's state and progress."""
    current = _session(workdir, progress=False).status()
    if as_json:
        sys.stdout.write(json.dumps(current, indent=2) + "\n")
        return
    table = Table(title=f"job {current['job_id']}")
    table.add_column("field")
    table.add_column("value")
    for key in ("state", "epoch", "epochs_done", "max_epochs", "step", "steps_per_epoch",
                "steps", "bootstraps", "refreshes", "awaiting_refresh", "seconds_per_step",
                "eta_seconds", "best_epoch", "restarts", "error"):
        table.add_row(key, str(current.get(key)))
    Console().print(table)

@app.command("fetch")
def fetch(
    workdir: WorkDir = DEFAULT_WORKDIR,
    poll: Annotated[float, typer.Option(help="Status poll interval, seconds.")] = 1.0,
) -> None:
    """Answer early-stopping questions (decrypting locally) and, in refresh mode "hospital",
    the cloud's refresh requests (long polls) until done; download weights."""
    from medblindtuner.hospital.client import ServiceError
    from medblindtuner.hospital.session import CloudSession

    hospital = _open(workdir)
    session = CloudSession.resume(hospital)
    final = _answer_cloud_questions(session, hospital, poll)
    for record in session.history:
        console.print(f"epoch {record['epoch']}: validation Brier loss "
                      f"{record['val_loss']:.5f}")
    try:
        session.fetch_result()
        final_epochs, best = final.get("epochs_done"), final.get("best_epoch")
    except (ServiceError, KeyError, TypeError, ValueError) as exc:
        _fail(f"the cloud's result could not be downloaded: {exc}")
    console.print(f"job finished after {final_epochs} epochs (best epoch {best}); "
                  f"encrypted weights in {hospital.folder.result}")


def _answer_cloud_questions(session, hospital, poll: float) -> dict:  # noqa: ANN001
    """The cloud's questions until the job ends. Every refusal and every malformed answer of
    the cloud ends here: one `error:` line, exit 2; malformed answers are recorded in the
    judge's state like any refusal (so a re-run refuses too). HTTP errors are not recorded
    (a network fault must not end the job)."""
    import httpx
    from tqdm import tqdm

    from medblindtuner.hospital.client import CloudProtocolError, JobFailed, ServiceError
    from medblindtuner.hospital.crypto import JudgeRefusal
    from medblindtuner.hospital.refresher import RefreshRefusal

    try:
        hospital.judge().require_open()
    except JudgeRefusal as exc:
        _fail(str(exc))
    plan = hospital.plan
    total = plan.config.epochs * len(plan.train_batch_sizes)
    with tqdm(total=total, desc="encrypted training", unit="step") as bar:
        def on_status(current: dict) -> None:
            bar.update(max(int(current.get("steps") or 0) - bar.n, 0))
            bar.set_postfix(state=str(current["state"])[:20])

        failure = None
        try:
            return session.answer_decisions(poll_s=poll, on_status=on_status)
        except (JudgeRefusal, RefreshRefusal) as exc:
            failure = str(exc)
        except CloudProtocolError as exc:  # recorded with the judge's state as it is now
            failure = str(hospital.judge().refuse(
                f"malformed answer from the cloud: {exc.message}"))
        except (KeyError, TypeError, ValueError) as exc:
            failure = str(hospital.judge().refuse(
                f"malformed answer from the cloud: {type(exc).__name__} {str(exc)[:200]}"))
        except (ServiceError, JobFailed, httpx.HTTPError) as exc:
            failure = str(exc)
    _fail(failure)  # after the progress bar closed its line
    raise AssertionError("unreachable")  # _fail exits


@app.command("evaluate")
def evaluate_cmd(
    workdir: WorkDir = DEFAULT_WORKDIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Decrypt the weights and report test ACC/AUC next to the plaintext trainers."""
    from medblindtuner.experiment import run_plain
    from medblindtuner.he.keys import BundleError
    from medblindtuner.training.plain import evaluate

    hospital = _open(workdir)
    plan, data, meta = hospital.plan, hospital.data, hospital.meta
    x, y = data.x, data.y
    try:
        weights = hospital.decrypt_result()
    except (BundleError, FileNotFoundError) as exc:
        _fail(f"{exc} (run `medblindtuner hospital fetch` first)")
    plain = run_plain(data, plan.config, plan.activation, plan.layout)
    mirror = np.asarray(plain["mirror"]["weights"])
    split = "test" if "test" in x else "val"
    report = {
        "split": split,
        "encrypted": evaluate(weights, x[split], y[split], plan.n_classes),
        "plaintext": plain["plaintext"]["test"] if split == "test" else None,
        "mirror": plain["mirror"]["test"] if split == "test" else None,
        "max_abs_weight_diff_vs_mirror": float(np.max(np.abs(weights - mirror))),
    }
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=float) + "\n")
        return
    table = Table(title=f"{meta['dataset']}: {split} split")
    table.add_column("model")
    table.add_column("ACC")
    table.add_column("AUC")
    for name in ("encrypted", "plaintext", "mirror"):
        if report[name]:
            table.add_row(name, f"{report[name]['acc']:.4f}", f"{report[name]['auc']:.4f}")
    Console().print(table)
    console.print(f"max |w_enc - w_mirror| = {report['max_abs_weight_diff_vs_mirror']:.2e}")

@app.command("predict")
def predict(
    workdir: WorkDir = DEFAULT_WORKDIR,
    split: Annotated[str | None, typer.Option(
        help="Score this prepared split (default: test); reports agreement with the "
             "plaintext predictions of the decrypted weights.")] = None,
    features: Annotated[Path | None, typer.Option(
        help="Score new rows: a FeatureSet .npz (from `features`) or an .npz with 'x', "
             "scaled with the keygen scaler.")] = None,
    features_split: Annotated[str | None, typer.Option(
        help="With --features (a FeatureSet file): only this split.")] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write predictions and the report to this JSON file.")] = None,
    poll: Annotated[float, typer.Option(help="Status poll interval, seconds.")] = 0.5,
    timeout: Annotated[float | None, typer.Option(help="Give up after seconds.")] = None,
) -> None:
    """Encrypted inference: encrypt rows here, the cloud scores them, decrypt here."""
    from medblindtuner.hospital.client import JobFailed, ServiceError
    from medblindtuner.hospital.session import CloudSession

    if split is not None and features is not None:
        _fail("give either --split or --features, not both")
    hospital = _open(workdir)
    x, labels, source = _rows_to_score(hospital, split, features, features_split)
    session = CloudSession.resume(hospital)
    try:
        prediction = session.predict(x, poll_s=poll, timeout_s=timeout)
        if labels is not None:
            session.ensure_result()  # the decrypted weights' plaintext predictions compare
    except (ServiceError, JobFailed, TimeoutError) as exc:
        _fail(str(exc))
    report = _prediction_report(hospital, session.job_id, prediction, x, labels, source)
    _print_predictions(report, prediction, source, json_path)


def _rows_to_score(hospital, split: str | None, features: Path | None,
                   features_split: str | None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(scaled rows, their labels or None, a description): a prepared split, or new rows."""
    if features is None:
        split = split or "test"
        x_all, y_all = hospital.data.x, hospital.data.y
        if split not in x_all:
            _fail(f"no prepared split {split!r} (have {sorted(x_all)})")
        x, labels, source = x_all[split], y_all[split], f"split {split}"
    else:
        try:
            x = hospital.scale(_raw_features(features, features_split))
        except ValueError as exc:
            _fail(f"{features}: {exc}")
        labels = None
        source = f"{features}" + (f" [{features_split}]" if features_split else "")
    if x.shape[1] != hospital.plan.n_features or len(x) == 0:
        _fail(f"rows have {x.shape[1]} columns (with bias); the model expects "
              f"{hospital.plan.n_features}")
    return x, labels, source


def _prediction_report(hospital, job_id: str, prediction, x: np.ndarray,
                       labels: np.ndarray | None, source: str) -> dict:
    """The JSON report: predictions and, for a labelled split, accuracy and agreement with
    the plaintext predictions of the decrypted weights."""
    probs, predicted = prediction.probabilities, prediction.classes
    report: dict = {
        "job_id": job_id, "query_id": prediction.query_id, "source": source,
        "n": int(len(x)), "n_classes": hospital.plan.n_classes,
        "cloud_seconds": prediction.cloud_seconds,
        "timings": {k: round(v, 3) for k, v in prediction.timings.items()},
    }
    if labels is not None:
        report["accuracy"] = float(np.mean(predicted == labels))
        plain = hospital.probabilities(hospital.decrypt_result(), x)
        report["agreement"] = {
            "identical_class_fraction": float(np.mean(plain.argmax(axis=1) == predicted)),
            "max_abs_prob_diff": float(np.max(np.abs(plain - probs))),
        }
    report["predictions"] = predicted.tolist()
    report["probabilities"] = probs.tolist()
    if labels is not None:
        report["labels"] = np.asarray(labels).astype(int).tolist()
    return report


def _print_predictions(report: dict, prediction, source: str, json_path: Path | None) -> None:
    """Rows to stdout (or the report to `json_path`), a summary to stderr."""
    probs, predicted = prediction.probabilities, prediction.classes
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write("row\tclass\t" + "\t".join(
            f"p{c}" for c in range(probs.shape[1])) + "\n")
        for i, (c, row) in enumerate(zip(predicted, probs, strict=True)):
            sys.stdout.write(f"{i}\t{c}\t" + "\t".join(f"{p:.6f}" for p in row) + "\n")
    counts = np.bincount(predicted, minlength=probs.shape[1]).tolist()
    console.print(f"{report['n']} rows from {source} scored under encryption (query set "
                  f"{prediction.query_id}); predicted class counts {counts}")
    if "agreement" in report:
        agreement = report["agreement"]
        console.print(f"accuracy {report['accuracy']:.4f}; agreement with plaintext "
                      f"predictions of the decrypted weights: "
                      f"{agreement['identical_class_fraction']:.4f} identical classes, "
                      f"max |prob diff| {agreement['max_abs_prob_diff']:.2e}")
    if json_path is not None:
        console.print(f"report: {json_path}")
