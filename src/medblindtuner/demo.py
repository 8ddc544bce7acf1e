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
    backbone: str = "auto"
    given: Overrides = field(default_factory=Overrides)  # settings the user gave
    workdir: Path = Path("runs/demo")
    report_dir: Path | None = None
    limit: int | None = None  # images per split (quick runs)
    insecure_test_params: bool = False
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
    from medblindtuner.data import load_medmnist
    from medblindtuner.experiment import (
        artifact_sizes,
        encrypted_run_summary,
        experiment_header,
        peak_rss_bytes,
        reference_runs,
        run_plain,
    )
    from medblindtuner.features import extract_features
    from medblindtuner.he.keys import bundle_size_bytes
    from medblindtuner.he.params import INSECURE_TEST, PRODUCTION
    from medblindtuner.hospital.client import HospitalClient
    from medblindtuner.hospital.hospital import Hospital
    from medblindtuner.report import build_report

    clock = PhaseClock()
    workdir = Path(options.workdir)
    hospital_dir, cloud_dir = workdir / "hospital", workdir / "cloud"  # the two roles
    report_dir = Path(options.report_dir or workdir / "report")
    params = INSECURE_TEST if options.insecure_test_params else PRODUCTION
    if options.insecure_test_params:
        console.print("[bold red]INSECURE test parameters (ring 4096): a demo of the "
                      "mechanics only, no security.[/]")

    with clock.phase("features", "1/8 hospital: data and frozen-backbone features"):
        dataset = load_medmnist(options.dataset, data_dir=options.data_dir)
        if options.limit:
            dataset = dataset.subset(options.limit)
        cache = {"cache_dir": options.feature_cache} if options.feature_cache else {}
        features = extract_features(dataset, backbone=options.backbone, **cache)
        console.print(f"{features.dataset_name}: {features.n_classes} classes, splits "
                      f"{features.sizes()}, {features.feature_dim}-d features")

    with clock.phase("plaintext", "2/8 hospital: tuned probe, training settings, plaintext "
                                  "reference and range check"):
        console.print("training settings (derived from train/validation unless given):")
        hospital = Hospital(hospital_dir, params, allow_insecure=options.insecure_test_params,
                            log=console.print)
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

    with clock.phase("keygen", "3/8 hospital: CKKS keys"):
        keyed = hospital.keyed
        hospital.generate_keys()
        console.print(f"{keyed.name}: ring {keyed.ring_dim}, public bundle "
                      f"{bundle_size_bytes(hospital.folder.public_bundle) / 2**20:.0f} MiB")

    with clock.phase("encrypt", "4/8 hospital: encrypt features and labels"):
        hospital.encrypt_dataset()
        hospital_rss = peak_rss_bytes()
        # the hospital only decrypts from now on: no evaluation keys in memory
        hospital.release_evaluation_keys()

    with LocalService(cloud_dir, insecure=options.insecure_test_params) as cloud:
        console.print(f"cloud service pid {cloud.process.pid} on {cloud.url} "
                      f"(API docs: {cloud.url}/docs)")
        with clock.phase("upload", "5/8 hospital -> cloud: upload bundle and ciphertexts"):
            client = HospitalClient(cloud.url)
            client.create_job()
            client.upload_dir("bundle", hospital.folder.public_bundle)
            client.upload_dir("dataset", hospital.folder.encrypted_dataset)
            client.start()

        with clock.phase("training", "6/8 cloud: encrypted training (hospital answers "
                                     "one early-stopping bit per epoch)"):
            judge = hospital.judge()
            last = {"line": ""}

            def on_status(status: dict) -> None:
                line = (f"state {status.get('state')} epoch {status.get('epoch')} step "
                        f"{status.get('step')}/{status.get('steps_per_epoch')} bootstraps "
                        f"{status.get('bootstraps')} ETA {status.get('eta_seconds')} s")
                if line != last["line"]:
                    console.print(line)
                    last["line"] = line

            client.answer_decisions(judge, poll_s=1.0, on_status=on_status)
            result = client.fetch_result(hospital.folder.result)

        with clock.phase("evaluate", "7/8 hospital: decrypt, evaluate, encrypted inference"):
            weights = hospital.decrypt_result()
            inference = _encrypted_inference(client, hospital, weights, options.inference)
        client.close()

    history = [{"epoch": e, "val_loss": loss} for e, loss in sorted(judge.losses.items())]
    encrypted = encrypted_run_summary(
        weights, data, history=history, epochs=int(result["epochs"]),
        best_epoch=int(result["best_epoch"]), steps=int(result["steps"]),
        wall_time_s=clock.timings["training"], ops=result.get("ops", {}),
        mirror_weights=np.asarray(plain["mirror"]["weights"]))
    if inference:
        encrypted["inference"] = inference
    results = {
        **experiment_header(data, plan, keyed, recipe),
        "class_names": dataset.class_names,
        "command": " ".join(part for part in (
            "medblindtuner demo --dataset", options.dataset, options.given.command_line(),
            "--insecure-test-params" if options.insecure_test_params else "",
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
    paths = build_report(json.loads(json.dumps(results, default=float)), report_dir)
    _print_summary(results, paths)
    return results


def _encrypted_inference(client, hospital, weights, enabled: bool):
    """Cloud scores the encrypted test split; compare with plaintext predictions."""
    if not enabled or not hasattr(client, "upload_queries"):
        return None
    x_test = hospital.data.x["test"]
    query_id = client.create_query()
    queries = hospital.encrypt_queries(x_test, hospital.folder.query(query_id) / "encrypted")
    client.upload_queries(queries, query_id=query_id)
    client.score(query_id)
    client.wait_scores(query_id)
    scores_dir = hospital.folder.query(query_id) / "scores"
    client.fetch_scores(query_id, scores_dir)
    encrypted_probs = hospital.decrypt_scores(scores_dir)
    plain_probs = hospital.probabilities(weights, x_test)
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
