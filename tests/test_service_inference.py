"""Encrypted inference through the cloud service and `medblindtuner hospital predict`.

One real service (insecure test parameters, binary task) trains one 2-epoch job; the module's
tests then score encrypted query sets against its encrypted weights. The cloud only sees the
public bundle and ciphertexts; decryption happens in this (hospital) process.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers_he import plan_and_keys, toy_problem
from test_service import MAX_UPLOAD, ServiceProcess

from medblindtuner.he.keys import HospitalKeys, looks_like_secret_key
from medblindtuner.hospital.client import HospitalClient, ServiceError, load_result_weights
from medblindtuner.hospital.crypto import (
    HospitalJudge,
    decrypt_scores,
    encrypt_dataset,
    encrypt_queries,
)
from medblindtuner.training.artifacts import load_scores
from medblindtuner.training.plain import TrainConfig, class_probabilities
from medblindtuner.training.plan import TrainingPlan


@dataclass
class Trained:
    """A finished job on a running service plus the hospital's keys and data."""

    server: ServiceProcess
    client: HospitalClient
    keys: HospitalKeys
    plan: TrainingPlan
    data: tuple
    root: Path
    weights: np.ndarray


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    data = toy_problem(2)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=2, batch_size=128, patience=5)
    plan, keys = plan_and_keys(2, config, data)
    keys.save_public_bundle(root / "bundle")
    keys.save_secret_key(root / "local" / "secret_key.bin")
    encrypt_dataset(keys, plan, *data).save(root / "dataset", keys.params)
    server = ServiceProcess(root / "cloud", "--max-upload-bytes", str(MAX_UPLOAD)).start()
    try:
        client = HospitalClient(server.url, progress=False)
        client.create_job()
        client.upload_dir("bundle", root / "bundle")
        client.upload_dir("dataset", root / "dataset")
        client.start()
        judge = HospitalJudge(keys, plan, len(data[3]))
        final = client.answer_decisions(judge, poll_s=0.3, timeout_s=240)
        assert final["state"] == "finished"
        client.fetch_result(root / "result")
        weights = load_result_weights(keys, plan, root / "result")
        yield Trained(server, client, keys, plan, data, root, weights)
    finally:
        server.stop()
        server.kill_workers()


def _score(t: Trained, x: np.ndarray, name: str) -> tuple[np.ndarray, str]:
    queries = encrypt_queries(t.keys, t.plan, x)
    queries.save(t.root / name / "queries", t.keys.params)
    query_id = t.client.upload_queries(t.root / name / "queries")
    started = t.client.score(query_id)
    assert started["state"] in ("queued", "scoring", "done")
    status = t.client.wait_scores(query_id, poll_s=0.2, timeout_s=120)
    assert status["state"] == "done" and status["n_rows"] == len(x)
    t.client.fetch_scores(query_id, t.root / name / "scores")
    scores, sizes = load_scores(t.root / name / "scores", t.keys.params)
    return decrypt_scores(t.keys, t.plan, scores, sizes), query_id


def test_encrypted_predictions_equal_plaintext(trained):
    x_train, _, x_val, _ = trained.data
    # Two query sets of one job: the validation rows (one ciphertext) and train + val rows
    # (more rows than fit one ciphertext, so several query ciphertexts).
    many = np.vstack([x_train, x_val])
    assert len(many) > trained.plan.layout.samples_per_ct
    for name, x in (("val", x_val), ("many", many)):
        probs, query_id = _score(trained, x, name)
        plain = class_probabilities(trained.weights, x, 2)
        assert probs.shape == plain.shape == (len(x), 2)
        assert np.array_equal(probs.argmax(axis=1), plain.argmax(axis=1)), name
        assert np.max(np.abs(probs - plain)) < 1e-3, name
    listed = trained.client._request("GET", trained.client._job("/queries")).json()["queries"]
    assert len(listed) >= 2 and all(q["state"] == "done" for q in listed)
    # The scoring worker ran in its own process; no secret key reached the cloud.
    query_dir = trained.server.data_dir / "jobs" / trained.client.job_id / "queries" / query_id
    assert (query_dir / "worker.log").exists()
    cloud = [p for p in trained.server.data_dir.rglob("*.bin") if p.is_file()]
    assert not [p for p in cloud if looks_like_secret_key(p)]
    trained.client.delete_query(query_id)
    assert not query_dir.exists()
    with pytest.raises(ServiceError) as err:
        trained.client.query_status(query_id)
    assert err.value.status_code == 404


def test_queries_for_other_parameters_refused(trained, tmp_path):
    x_val = trained.data[2][:5]
    encrypt_queries(trained.keys, trained.plan, x_val).save(tmp_path / "q", trained.keys.params)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for name, fingerprint, fmt in (("params", "0123456789abcdef", manifest["format"]),
                                   ("format", manifest["params_fingerprint"], "nonsense/1")):
        (other / "manifest.json").write_text(json.dumps(
            {**manifest, "params_fingerprint": fingerprint, "format": fmt}))
        with pytest.raises(ServiceError) as err:
            trained.client.upload_queries(other)
        assert err.value.status_code == 400, name
        if name == "params":
            assert "other CKKS parameters" in err.value.message
    # Scoring before the files are there is refused too.
    query_id = trained.client.create_query()
    with pytest.raises(ServiceError) as err:
        trained.client.score(query_id)
    assert err.value.status_code == 409
    with pytest.raises(ServiceError) as err:
        trained.client.scores_manifest(query_id)
    assert err.value.status_code == 409


def test_queries_need_a_finished_job(trained):
    fresh = HospitalClient(trained.server.url, progress=False)
    fresh.create_job()
    with pytest.raises(ServiceError) as err:
        fresh.create_query()
    assert err.value.status_code == 409
    fresh.delete()


def test_inference_endpoints_need_that_jobs_token(trained):
    owner = trained.client
    intruder = HospitalClient(trained.server.url, progress=False)
    intruder.create_job()
    query_id = owner.create_query()
    q = f"/jobs/{owner.job_id}/queries/{query_id}"
    endpoints = [
        ("POST", f"/jobs/{owner.job_id}/queries", {}),
        ("GET", f"/jobs/{owner.job_id}/queries", {}),
        ("GET", q, {}),
        ("PUT", f"{q}/manifest", {"content": b"{}"}),
        ("PUT", f"{q}/files/query_0000.bin/chunks/0",
         {"content": b"x", "headers": {"X-Chunk-SHA256": "0" * 64}}),
        ("POST", f"{q}/files/query_0000.bin/finalize", {}),
        ("POST", f"{q}/score", {}),
        ("GET", f"{q}/scores", {}),
        ("GET", f"{q}/scores/files/score_0000_0.bin", {}),
        ("DELETE", q, {}),
    ]
    with httpx.Client(base_url=trained.server.url) as http:
        for method, path, kwargs in endpoints:
            headers = dict(kwargs.get("headers", {}))
            extra = {k: v for k, v in kwargs.items() if k != "headers"}
            anonymous = http.request(method, path, headers=headers, **extra)
            assert anonymous.status_code == 401, (method, path, anonymous.text)
            wrong = http.request(method, path, **extra, headers={
                **headers, "Authorization": f"Bearer {intruder.token}"})
            assert wrong.status_code == 403, (method, path, wrong.text)
        # The intruder's own job cannot reach the owner's query set either (403, as for jobs).
        cross = http.get(f"/jobs/{intruder.job_id}/queries/{query_id}",
                         headers={"Authorization": f"Bearer {intruder.token}"})
        assert cross.status_code == 403
    assert owner.query_status(query_id)["state"] == "uploading"
    owner.delete_query(query_id)
    intruder.delete()


def test_hospital_predict_cli(trained, tmp_path):
    """`hospital predict --split` on a work directory holding the trained job's keys."""
    from typer.testing import CliRunner

    from medblindtuner.cli.main import app

    work = tmp_path / "hospital"
    shutil.copytree(trained.root / "bundle", work / "public_bundle")
    (work / "local").mkdir(parents=True)
    shutil.copy(trained.root / "local" / "secret_key.bin", work / "local" / "secret_key.bin")
    x_train, y_train, x_val, y_val = trained.data
    np.savez(work / "local" / "prepared.npz", train_x=x_train, train_y=y_train, val_x=x_val,
             val_y=y_val, test_x=x_val[:17], test_y=y_val[:17])
    (work / "plan.json").write_text(json.dumps({
        "plan": trained.plan.to_dict(), "params": trained.keys.params.to_dict(),
        "n_val": len(y_val), "n_classes": 2, "dataset": "toy", "insecure": True,
        "pca_dims": None, "features": ""}))
    (work / "job.json").write_text(json.dumps({
        "url": trained.server.url, "job_id": trained.client.job_id,
        "token": trained.client.token}))
    out = tmp_path / "predictions.json"
    result = CliRunner().invoke(app, ["hospital", "predict", "--workdir", str(work),
                                      "--split", "test", "--json", str(out), "--poll", "0.2"])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(out.read_text())
    assert report["n"] == 17 and len(report["predictions"]) == 17
    assert report["agreement"]["identical_class_fraction"] == 1.0
    assert report["agreement"]["max_abs_prob_diff"] < 1e-3
    assert (work / "result" / "manifest.json").exists()  # fetched for the comparison
