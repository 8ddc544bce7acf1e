"""End-to-end demo: hospital and cloud as separate processes on loopback, real data, real CKKS.

Phases (each timed and shown with progress):
  1. hospital: load MedMNIST, extract features with a frozen pretrained backbone, scale/PCA
  2. hospital: plaintext reference trainers (exact head and polynomial mirror), range check
  3. hospital: CKKS keys; public bundle (evaluation keys only) and secret key (stays home)
  4. hospital: encrypt features and labels
  5. cloud:    start `medblindtuner.service` as its own process on 127.0.0.1
  6. hospital: upload bundle + ciphertexts, start the job, answer the per-epoch early-stopping
               question by decrypting one scalar, download the encrypted weights
  7. hospital: decrypt, evaluate on the test split, encrypted inference on the test split
  8. report:   report.md / report.html with tables and plots
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from medblindtuner.hospital.recipe import Overrides
from medblindtuner.service.local import LocalService

console = Console()


@dataclass
class DemoOptions:
    dataset: str = "breastmnist"
    data_dir: Path | None = None
    backbone: str = "auto"  # or timm:ARCH, onnx:PATH (features.load_backbone)
    weights: str | None = None  # the backbone's local weight file (None: bundled or hub)
    given: Overrides = field(default_factory=Overrides)  # settings the user gave
    workdir: Path = Path("runs/demo")
    report_dir: Path | None = None
    limit: int | None = None  # images per split (quick runs)
    insecure_test_params: bool = False
    refresh: str | None = None  # None: he.params.default_refresh()
    inference: bool = True
    feature_cache: Path | None = None  # None: the default cache folder


@dataclass
class PhaseClock:
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    first_output_s: float | None = None

    @contextmanager
    def phase(self, key: str, title: str):
        console.rule(f"[bold]{title}")
        start = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - start
        console.print(f"[green]done[/] {title} in {self.timings[key]:.1f} s "
                      f"(elapsed {time.perf_counter() - self.started:.0f} s)")


def run_demo(options: DemoOptions) -> dict:
    """Run every phase; returns the results dict (report schema) and writes the report."""
    from medblindtuner.report import build_report

    clock = PhaseClock()
    workdir = Path(options.workdir)
    report_dir = Path(options.report_dir or workdir / "report")
    if options.insecure_test_params:
        console.print("[bold red]INSECURE test parameters (ring 4096): a demo of the "
                      "mechanics only, no security.[/]")
    dataset, features = _features_phase(options, clock)
    hospital, plain = _plaintext_phase(options, clock, features, workdir / "hospital")
    hospital_rss = _keys_phase(clock, hospital)
    cloud = _cloud_phases(options, clock, hospital, workdir / "cloud")  # the two roles
    results = _results(options, clock, dataset, hospital, plain, cloud, hospital_rss)
    paths = build_report(json.loads(json.dumps(results, default=float)), report_dir)
    _print_summary(results, paths)
    return results


def _features_phase(options: DemoOptions, clock: PhaseClock):
    from medblindtuner.data import load_medmnist
    from medblindtuner.features import extract_features

    with clock.phase("features", "1/8 hospital: data and frozen-backbone features"):
        dataset = load_medmnist(options.dataset, data_dir=options.data_dir)
        if options.limit:
            dataset = dataset.subset(options.limit)
        cache = {"cache_dir": options.feature_cache} if options.feature_cache else {}
        features = extract_features(dataset, backbone=options.backbone,
                                    weights=options.weights, **cache)
        console.print(f"{features.dataset_name}: {features.n_classes} classes, splits "
                      f"{features.sizes()}, {features.feature_dim}-d features")
    return dataset, features


def _plaintext_phase(options: DemoOptions, clock: PhaseClock, features, hospital_dir: Path):
    """The prepared hospital and the plaintext runs (probe, published, exact head, mirror)."""
    from medblindtuner.experiment import reference_runs, run_plain
    from medblindtuner.he.params import default_refresh
    from medblindtuner.hospital.hospital import Hospital

    with clock.phase("plaintext", "2/8 hospital: tuned probe, training settings, plaintext "
                                  "reference and range check"):
        console.print("training settings (derived from train/validation unless given):")
        hospital = Hospital(hospital_dir, insecure_test_params=options.insecure_test_params,
                            refresh=options.refresh or default_refresh(), log=console.print)
        recipe = hospital.prepare(features, options.given)
        data, plan = hospital.data, hospital.plan
        plain = {**reference_runs(data, recipe),
                 **run_plain(data, plan.config, plan.activation, plan.layout)}
        clock.first_output_s = time.perf_counter() - clock.started
        probe = recipe.probe.test
        console.print(f"probe (scikit-learn, full features) test ACC {probe['acc']:.4f} AUC "
                      f"{probe['auc']:.4f}; plaintext head ACC "
                      f"{plain['plaintext']['test']['acc']:.4f} (mirror "
                      f"{plain['mirror']['test']['acc']:.4f}); logits stay within "
                      f"{plain['mirror']['max_abs_logit_slot']:.2f} <= "
                      f"{plan.activation.logit_bound}")
        if (hint := plan.batch_hint()) is not None:
            console.print(f"[yellow]note:[/yellow] {hint}")
    return hospital, plain


def _keys_phase(clock: PhaseClock, hospital) -> int:
    """Keys and the encrypted dataset; the hospital's peak memory until then."""
    from medblindtuner.experiment import peak_rss_bytes
    from medblindtuner.he.keys import bundle_size_bytes

    with clock.phase("keygen", "3/8 hospital: CKKS keys"):
        params = hospital.params
        hospital.generate_keys()
        console.print(f"{params.name}: ring {params.ring_dim}, public bundle "
                      f"{bundle_size_bytes(hospital.folder.public_bundle) / 2**20:.0f} MiB")

    with clock.phase("encrypt", "4/8 hospital: encrypt features and labels"):
        hospital.encrypt_dataset()
        hospital_rss = peak_rss_bytes()
        # the hospital only decrypts from now on: no evaluation keys in memory
        hospital.release_evaluation_keys()
    return hospital_rss


@dataclass
class _CloudRun:
    """What the demo's cloud phases leave: the session, the result manifest, the decrypted
    weights and the encrypted-inference check."""

    session: object
    result: dict
    weights: np.ndarray
    inference: dict | None


def _cloud_phases(options: DemoOptions, clock: PhaseClock, hospital,
                  cloud_dir: Path) -> _CloudRun:
    from medblindtuner.hospital.session import CloudSession

    with LocalService(cloud_dir, insecure=options.insecure_test_params) as cloud:
        console.print(f"cloud service pid {cloud.process.pid} on {cloud.url} "
                      f"(API docs: {cloud.url}/docs)")
        with clock.phase("upload", "5/8 hospital -> cloud: upload bundle and ciphertexts"):
            session = CloudSession.create(hospital, cloud.url)
            session.submit()

        refreshes = " and the refreshes" if hospital.params.refreshed_by_hospital else ""
        with clock.phase("training", "6/8 cloud: encrypted training (hospital answers "
                                     f"one early-stopping bit per epoch{refreshes})"):
            session.answer_decisions(poll_s=1.0, on_status=_status_printer())
            result = session.fetch_result()

        with clock.phase("evaluate", "7/8 hospital: decrypt, evaluate, encrypted inference"):
            weights = session.decrypt()
            inference = _encrypted_inference(session, weights) if options.inference else None
        session.close()
    return _CloudRun(session, result, weights, inference)


def _results(options: DemoOptions, clock: PhaseClock, dataset, hospital, plain: dict,
             cloud: _CloudRun, hospital_rss: int) -> dict:
    """The results dict in the report's schema."""
    from medblindtuner.experiment import (
        artifact_sizes,
        encrypted_run_summary,
        experiment_header,
    )

    result = cloud.result
    encrypted = encrypted_run_summary(
        cloud.weights, hospital.data, history=cloud.session.history,
        epochs=int(result["epochs"]), best_epoch=int(result["best_epoch"]),
        steps=int(result["steps"]), wall_time_s=clock.timings["training"],
        ops=result.get("ops", {}), mirror_weights=np.asarray(plain["mirror"]["weights"]))
    if cloud.inference:
        encrypted["inference"] = cloud.inference
    return {
        **experiment_header(hospital.data, hospital.plan, hospital.params, hospital.recipe),
        "class_names": dataset.class_names,
        "command": " ".join(part for part in (
            "medblindtuner demo --dataset", options.dataset, options.given.command_line(),
            "--insecure-test-params" if options.insecure_test_params else "",
            f"--refresh {hospital.params.refresh}",
            f"--limit {options.limit}" if options.limit else "") if part),
        "sizes_bytes": artifact_sizes(hospital.folder.public_bundle,
                                      hospital.folder.secret_key,
                                      hospital.folder.encrypted_dataset),
        "peak_rss_bytes": {"hospital": hospital_rss,
                           "cloud": result.get("peak_rss_bytes")},
        "timings_s": {**clock.timings, "total": time.perf_counter() - clock.started,
                      "time_to_first_result": clock.first_output_s},
        "runs": {**plain, "encrypted": encrypted},
    }


def _status_printer():
    """An `on_status` callback that prints the job's progress when it changes."""
    last = {"line": ""}

    def on_status(status: dict) -> None:
        line = (f"state {status.get('state')} epoch {status.get('epoch')} step "
                f"{status.get('step')}/{status.get('steps_per_epoch')} bootstraps "
                f"{status.get('bootstraps')} ETA {status.get('eta_seconds')} s")
        if line != last["line"]:
            console.print(line)
            last["line"] = line

    return on_status


def _encrypted_inference(session, weights) -> dict:
    """Cloud scores the encrypted test split; compare with plaintext predictions."""
    x_test = session.hospital.data.x["test"]
    encrypted_probs = session.predict(x_test).probabilities
    plain_probs = session.hospital.probabilities(weights, x_test)
    agree = float(np.mean(encrypted_probs.argmax(1) == plain_probs.argmax(1)))
    diff = float(np.max(np.abs(encrypted_probs - plain_probs)))
    console.print(f"encrypted inference on {len(x_test)} test images: predictions agree with "
                  f"plaintext on {agree:.1%}, max |prob diff| {diff:.1e}")
    return {"n": len(x_test), "agreement": agree, "max_abs_prob_diff": diff}


def _print_summary(results: dict, paths: dict) -> None:
    runs = results["runs"]
    console.rule("[bold]8/8 summary")
    for name in ("published", "probe", "plaintext", "mirror", "encrypted"):
        if name not in runs:
            continue
        run = runs[name]
        epochs = f"  epochs {run['epochs']}" if "epochs" in run else ""
        console.print(f"{run['label'][:60]:60s} test ACC {run['test']['acc']:.4f} "
                      f"AUC {run['test']['auc']:.4f}{epochs}")
    enc = runs["encrypted"]["test"]

    def gap(ref: str, metric: str) -> str:
        return f"{100 * (enc[metric] - runs[ref]['test'][metric]):+.2f}"

    console.print(f"encrypted - probe: ACC {gap('probe', 'acc')} / AUC {gap('probe', 'auc')} "
                  f"points; encrypted - plaintext: ACC {gap('plaintext', 'acc')} points; "
                  f"total wall time {results['timings_s']['total'] / 60:.1f} min")
    console.print(f"report: {paths.get('markdown')} and {paths.get('html')}")
