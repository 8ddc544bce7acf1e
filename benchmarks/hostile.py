"""Replay a catalogue of hostile inputs and faults against a real local service.

Starts `python -m medblindtuner.service serve --insecure-test-params` in a temporary data
directory, makes a hospital's real artifacts (tiny insecure ring), keeps two canary jobs (one
fully uploaded, one trained to the end) and then tries every case of the catalogue: malformed,
oversized and deep JSON, wrong types, out-of-range numbers, flipped bits in every artifact
kind, truncated files, chunk re-sends and out-of-order chunks, foreign and forged tokens, path
traversal, quota floods, a worker killed with SIGKILL mid-epoch and a service restart.

A case is *handled* when every response it provoked has one of the expected status codes,
none was a 5xx, the service still answers, and the canaries are untouched (their state, their
upload records and, at the end, the bytes of their files and results). Prints

    N tried, N handled, 0 defects; data lost: no

or the defects. `--quick` leaves out the cases that train or upload the large rotation keys
(the fast test runs that subset).

    .venv/bin/python benchmarks/hostile.py [--quick] [--json hostile.json]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hostile_round2 next to this file

from medblindtuner.he.params import INSECURE_TEST, PRODUCTION
from medblindtuner.hospital.client import HospitalClient
from medblindtuner.hospital.crypto import HospitalJudge, encrypt_dataset
from medblindtuner.service.local import LocalService
from medblindtuner.training.plain import TrainConfig, add_bias
from medblindtuner.training.plan import TrainingPlan

CHUNK = 1 << 20
OK = (200, 201)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the service under test -----------------------------------------------------------------
def hostile_service(data_dir: Path, limits: list[str]) -> LocalService:
    """A real `serve` process on the insecure ring, with `--limit` overrides."""
    extra = ["--chunk-bytes", str(CHUNK)]
    for item in limits:
        extra += ["--limit", item]
    return LocalService(data_dir, *extra, insecure=True, log_name="server.out",
                        start_timeout_s=60)


# ---- the hospital's artifacts ----------------------------------------------------------------
@dataclass
class Hospital:
    root: Path
    keys: object
    plan: TrainingPlan
    n_val: int

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    def manifest(self, kind: str) -> dict:
        return json.loads((self.root / kind / "manifest.json").read_text())

    def file(self, kind: str, name: str) -> bytes:
        return (self.root / kind / name).read_bytes()

    def judge(self) -> HospitalJudge:
        return HospitalJudge(self.keys, self.plan, self.n_val)


def make_hospital(root: Path) -> Hospital:
    from medblindtuner.he.keys import HospitalKeys

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, 7)) * 1.5

    def split(n: int):
        y = rng.integers(0, 2, n)
        return centers[y] + rng.normal(size=(n, 7)), y

    (xt, yt), (xv, yv) = split(120), split(40)
    scale = np.linalg.norm(xt, axis=1).max()
    data = (add_bias(xt / scale), yt, add_bias(np.clip(xv / scale, -1, 1)), yv)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=2, batch_size=128, patience=5)
    plan = TrainingPlan.create(INSECURE_TEST, data[0], data[2], 2, config)
    params = INSECURE_TEST.with_bootstrap_slots(plan.bootstrap_slots)
    keys = HospitalKeys.generate(params, plan.rotation_indices, allow_insecure=True,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    keys.save_public_bundle(root / "bundle")
    keys.save_secret_key(root / "secret" / "secret_key.bin")
    encrypt_dataset(keys, plan, *data).save(root / "dataset", keys.params)
    return Hospital(root, keys, plan, len(yv))


# ---- one case --------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    run: Callable[[Lab], None]  # makes requests through `lab`, asserts its own expectations
    heavy: bool = False  # trains or uploads the rotation keys: not in --quick


class Defect(Exception):
    """A case got an answer it must not get."""


@dataclass
class Lab:
    """The service, the hospital and an HTTP client that records every status it sees."""

    service: LocalService
    hospital: Hospital
    tmp: Path
    statuses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.service.url, timeout=120, event_hooks={
            "response": [lambda response: self.statuses.append(response.status_code)]})

    # plumbing
    def new_job(self) -> tuple[str, dict[str, str]]:
        response = self.expect(self.http.post("/jobs"), 201)
        job = response.json()
        return job["job_id"], {"Authorization": f"Bearer {job['token']}"}

    def expect(self, response: httpx.Response, *allowed: int) -> httpx.Response:
        if response.status_code not in allowed:
            raise Defect(f"{response.request.method} {response.request.url.path[:80]}: "
                         f"{response.status_code} (expected {allowed}): {response.text[:200]}")
        return response

    def manifest(self, job: str, auth: dict, kind: str, raw: bytes | dict) -> httpx.Response:
        body = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        return self.http.put(f"/jobs/{job}/artifacts/{kind}/manifest", content=body,
                             headers=auth)

    def chunk(self, job: str, auth: dict, kind: str, name: str, index: int | str,
              data: bytes, digest: str | None = None) -> httpx.Response:
        return self.http.put(f"/jobs/{job}/artifacts/{kind}/files/{name}/chunks/{index}",
                             content=data, headers={**auth,
                                                    "X-Chunk-SHA256": digest or sha(data)})

    def finalize(self, job: str, auth: dict, kind: str, name: str) -> httpx.Response:
        return self.http.post(f"/jobs/{job}/artifacts/{kind}/files/{name}/finalize",
                              headers=auth)

    def send_file(self, job: str, auth: dict, kind: str, name: str, data: bytes,
                  order: list[int] | None = None) -> httpx.Response:
        """All chunks (in `order`), then finalize; returns the finalize response."""
        n = max(1, -(-len(data) // CHUNK))
        for index in order or range(n):
            self.expect(self.chunk(job, auth, kind, name, index,
                                   data[index * CHUNK:(index + 1) * CHUNK]), *OK)
        return self.finalize(job, auth, kind, name)

    def upload(self, job: str, auth: dict, kind: str, manifest: dict | None = None,
               files: dict[str, bytes] | None = None) -> httpx.Response | None:
        """A whole artifact; stops at (and returns) the first refused answer."""
        manifest = manifest or self.hospital.manifest(kind)
        response = self.manifest(job, auth, kind, manifest)
        if response.status_code not in OK:
            return response
        for name in sorted(manifest["files"]):
            data = (files or {}).get(name) or self.hospital.file(kind, name)
            response = self.send_file(job, auth, kind, name, data)
            if response.status_code not in OK:
                return response
        return None


# ---- the catalogue ----------------------------------------------------------------------------
def refused_manifest(kind: str, change: Callable[[dict], dict | bytes], *allowed: int) -> Callable:
    """A case: a fresh job, a valid bundle manifest first (for dataset cases), then `change`d
    manifest of `kind`, answered with one of `allowed`."""
    def run(lab: Lab) -> None:
        job, auth = lab.new_job()
        if kind == "dataset":
            lab.expect(lab.manifest(job, auth, "bundle", lab.hospital.manifest("bundle")), 200)
        changed = change(copy.deepcopy(lab.hospital.manifest(kind)))
        lab.expect(lab.manifest(job, auth, kind, changed), *allowed)
        status = lab.expect(lab.http.get(f"/jobs/{job}/artifacts/{kind}", headers=auth), 200)
        if status.json()["manifest"] is not None and allowed != OK:
            raise Defect("a refused manifest was recorded")
        lab.expect(lab.http.delete(f"/jobs/{job}", headers=auth), 200)
    return run


def with_file(name: str, entry: object) -> Callable[[dict], dict]:
    def change(m: dict) -> dict:
        m["files"][name] = entry
        return m
    return change


def set_path(path: str, value: object) -> Callable[[dict], dict]:
    """Set a dotted path (e.g. "plan.config.epochs") of the manifest."""
    def change(m: dict) -> dict:
        node = m
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
        return m
    return change


def raw_json(text: bytes) -> Callable[[dict], bytes]:
    return lambda _m: text


def manifest_cases() -> list[Case]:
    good_entry = {"sha256": "0" * 64, "bytes": 10}
    b, d = "bundle", "dataset"
    specs: list[tuple[str, str, Callable, tuple[int, ...]]] = [
        ("not JSON", b, raw_json(b"{not json"), (400,)),
        ("empty body", b, raw_json(b""), (400,)),
        ("JSON array", b, raw_json(b"[1, 2]"), (422,)),
        ("JSON null", b, raw_json(b"null"), (422,)),
        ("JSON string", b, raw_json(b'"files"'), (422,)),
        ("100k-deep nesting", b, raw_json(b"[" * 100_000 + b"]" * 100_000), (422,)),
        ("17-deep nesting", b, raw_json(b'{"files": {}, "x": ' + b"[" * 17 + b"]" * 17 + b"}"),
         (422,)),
        ("5000-digit integer", b, raw_json(b'{"files": {}, "n": ' + b"9" * 5000 + b"}"), (422,)),
        ("1e400 float", b, raw_json(b'{"files": {}, "n": 1e400}'), (422,)),
        ("NaN", b, raw_json(b'{"files": {}, "n": NaN}'), (422,)),
        ("Infinity", b, raw_json(b'{"files": {}, "n": -Infinity}'), (422,)),
        ("invalid UTF-8", b, raw_json(b'{"files": {"\xff\xfe": 1}}'), (400,)),
        ("16 MiB padded manifest", b, lambda m: json.dumps(m).encode() + b" " * (16 << 20),
         (413,)),
        ("5 MiB padded manifest", b, lambda m: json.dumps(m).encode() + b" " * (5 << 20),
         (413,)),
        ("no files key", b, lambda m: {k: v for k, v in m.items() if k != "files"}, (422,)),
        ("files is a list", b, set_path("files", []), (422,)),
        ("bytes is a bool", b, with_file("context.bin", {"sha256": "0" * 64, "bytes": True}),
         (422,)),
        ("bytes is a string", b, with_file("context.bin", {"sha256": "0" * 64, "bytes": "10"}),
         (422,)),
        ("bytes negative", b, with_file("context.bin", {"sha256": "0" * 64, "bytes": -1}),
         (422,)),
        ("zero-byte file", b, with_file("context.bin", {"sha256": "0" * 64, "bytes": 0}),
         (422,)),
        ("bytes is a float", b, with_file("context.bin", {"sha256": "0" * 64, "bytes": 1.5}),
         (422,)),
        ("bytes 2^60", b, with_file("context.bin", {"sha256": "0" * 64, "bytes": 1 << 60}),
         (413, 422)),
        ("file over the per-file limit", b, with_file("context.bin", {"sha256": "0" * 64,
                                                                      "bytes": 1 << 40}),
         (413,)),
        ("sha256 not hex", b, with_file("context.bin", {"sha256": "z" * 64, "bytes": 10}),
         (422,)),
        ("sha256 upper case", b, with_file("context.bin", {"sha256": "A" * 64, "bytes": 10}),
         (422,)),
        ("file entry extra field", b, with_file("context.bin", {**good_entry, "path": "/x"}),
         (422,)),
        ("path traversal name", b, with_file("../../etc/passwd", good_entry), (400,)),
        ("absolute path name", b, with_file("/etc/passwd", good_entry), (400,)),
        ("hidden file name", b, with_file(".bashrc", good_entry), (400,)),
        ("manifest.json as a file", b, with_file("manifest.json", good_entry), (400,)),
        ("NUL in a name", b, with_file("a\x00b.bin", good_entry), (400,)),
        ("non-ASCII name", b, with_file("clé.bin", good_entry), (400,)),
        ("extra secret_key.bin", b, with_file("secret_key.bin", good_entry), (400,)),
        ("missing public key", b, lambda m: {**m, "files": {k: v for k, v in m["files"].items()
                                                            if k != "public_key.bin"}}, (400,)),
        ("unknown top-level field", b, set_path("note", "hi"), (422,)),
        ("wrong format", b, set_path("format", "medblindtuner-public-bundle/999"), (400,)),
        ("fingerprint mismatch", b, set_path("params_fingerprint", "0" * 16), (400,)),
        ("ring_dim a bool", b, set_path("params.ring_dim", True), (422,)),
        ("ring_dim not a power of two", b, set_path("params.ring_dim", 5000), (422,)),
        ("ring_dim 2^30", b, set_path("params.ring_dim", 1 << 30), (422,)),
        ("depth 10^6", b, set_path("params.depth", 10**6), (422,)),
        ("unknown security level", b, set_path("params.security", "HEStd_0"), (422,)),
        ("unknown key distribution", b, set_path("params.secret_key_dist", "X"), (422,)),
        ("100 bootstrap slot counts", b, set_path("params.bootstrap_slots", [8] * 100),
         (422,)),
        ("rotation index 2^40", b, set_path("rotation_indices", [1 << 40]), (422,)),
        ("dataset before bundle", d, lambda m: m, (200,)),  # replaced below: needs no bundle
        ("epochs 10^30", d, set_path("plan.config.epochs", 10**30), (422,)),
        ("epochs 0", d, set_path("plan.config.epochs", 0), (422,)),
        ("epochs a bool", d, set_path("plan.config.epochs", True), (422,)),
        ("epochs 5000", d, set_path("plan.config.epochs", 5000), (422,)),
        ("epochs a string", d, set_path("plan.config.epochs", "2"), (422,)),
        ("learning rate negative", d, set_path("plan.config.learning_rate", -1.0), (422,)),
        ("momentum 1.5", d, set_path("plan.config.momentum", 1.5), (422,)),
        ("batch size 0", d, set_path("plan.train_batch_sizes", [0]), (422,)),
        ("batch of 10^6 samples", d, set_path("plan.train_batch_sizes", [10**6]), (422,)),
        ("batch sizes strings", d, set_path("plan.train_batch_sizes", ["120"]), (422,)),
        ("batches not matching files", d, set_path("plan.train_batch_sizes", [60, 60]), (400,)),
        ("validation chunk too large", d, set_path("plan.val_batch_sizes", [5000]), (422,)),
        ("one class", d, set_path("plan.n_classes", 1), (422,)),
        ("activation for 3 classes", d, set_path("plan.activation.n_classes", 3), (422,)),
        ("sigmoid degree 10^6", d, set_path("plan.activation.sigmoid.degree", 10**6), (422,)),
        ("features beyond the slots", d, set_path("plan.n_features", 5000), (422,)),
        ("plan slots differ from bundle", d, set_path("plan.slots", 1024), (400, 422)),
        ("dataset of other parameters", d, set_path("params_fingerprint", "f" * 16), (400,)),
        ("dataset file missing", d, lambda m: {**m, "files": dict(list(m["files"].items())[1:])},
         (400,)),
    ]
    cases = [Case(f"manifest: {name}", refused_manifest(kind, change, *allowed))
             for name, kind, change, allowed in specs if name != "dataset before bundle"]

    def dataset_first(lab: Lab) -> None:
        job, auth = lab.new_job()
        lab.expect(lab.manifest(job, auth, "dataset", lab.hospital.manifest("dataset")), 409)

    def changed_again(lab: Lab) -> None:
        job, auth = lab.new_job()
        bundle = lab.hospital.manifest("bundle")
        lab.expect(lab.manifest(job, auth, "bundle", bundle), 200)
        lab.expect(lab.manifest(job, auth, "bundle", bundle), 200)  # identical: a no-op
        lab.expect(lab.manifest(job, auth, "bundle", {**bundle, "rotation_indices": [1]}), 409)

    return cases + [Case("manifest: dataset before bundle", dataset_first),
                    Case("manifest: a different manifest re-sent", changed_again)]


def chunk_cases() -> list[Case]:
    name = "public_key.bin"

    def prepared(lab: Lab) -> tuple[str, dict, bytes]:
        job, auth = lab.new_job()
        lab.expect(lab.manifest(job, auth, "bundle", lab.hospital.manifest("bundle")), 200)
        return job, auth, lab.hospital.file("bundle", name)

    def case(fn: Callable[[Lab, str, dict, bytes], None]) -> Callable[[Lab], None]:
        def run(lab: Lab) -> None:
            job, auth, data = prepared(lab)
            fn(lab, job, auth, data)
            lab.expect(lab.http.delete(f"/jobs/{job}", headers=auth), 200)
        return run

    first = lambda data: data[:CHUNK]  # noqa: E731
    specs: list[tuple[str, Callable]] = [
        ("no SHA-256 header", lambda lab, j, a, d: lab.expect(lab.http.put(
            f"/jobs/{j}/artifacts/bundle/files/{name}/chunks/0", content=first(d),
            headers=a), 400)),
        ("SHA-256 header not hex", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", name, 0, first(d), "x" * 64), 400)),
        ("wrong SHA-256 header", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", name, 0, first(d), sha(b"other")), 400)),
        ("truncated chunk", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", name, 0, first(d)[:-1]), 400)),
        ("over-long chunk", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", name, 0, first(d) + b"x"), 413)),
        ("negative index", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", name, -1, first(d)), 422)),
        ("index past the end", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", name, 99, first(d)), 400)),
        ("5000-digit index", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", name, "9" * 5000, first(d)), 422)),
        ("index not a number", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", name, "zero", first(d)), 422)),
        ("unknown file", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", "evil.bin", 0, first(d)), 404)),
        ("encoded traversal file name", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "bundle", "..%2F..%2Fjobs.sqlite3", 0, first(d)), 404)),
        ("unknown artifact kind", lambda lab, j, a, d: lab.expect(
            lab.chunk(j, a, "weights", name, 0, first(d)), 404)),
        ("finalize before all chunks", lambda lab, j, a, d: (
            lab.expect(lab.chunk(j, a, "bundle", name, 0, first(d)), 200),
            lab.expect(lab.finalize(j, a, "bundle", name), 409))),
        ("same chunk sent three times", lambda lab, j, a, d: [
            lab.expect(lab.chunk(j, a, "bundle", name, 0, first(d)), 200) for _ in range(3)]),
        ("chunks out of order", lambda lab, j, a, d: lab.expect(
            lab.send_file(j, a, "bundle", name, d, order=[1, 0]), 200)),
        ("chunk re-sent with other bytes", lambda lab, j, a, d: (
            lab.expect(lab.chunk(j, a, "bundle", name, 0, b"\x00" * CHUNK), 200),
            lab.expect(lab.send_file(j, a, "bundle", name, d), 200))),  # last write wins
        ("tampered file, consistent chunks", lambda lab, j, a, d: lab.expect(
            lab.send_file(j, a, "bundle", name, d[:-1] + bytes([d[-1] ^ 1])), 400)),
        ("chunk after finalize", lambda lab, j, a, d: (
            lab.expect(lab.send_file(j, a, "bundle", name, d), 200),
            lab.expect(lab.chunk(j, a, "bundle", name, 0, b"\x00" * CHUNK), 200),
            check_bytes(lab, j, "bundle", name, d))),
        ("finalize twice", lambda lab, j, a, d: (
            lab.expect(lab.send_file(j, a, "bundle", name, d), 200),
            lab.expect(lab.finalize(j, a, "bundle", name), 200))),
        ("start with uploads missing", lambda lab, j, a, d: lab.expect(
            lab.http.post(f"/jobs/{j}/start", headers=a), 409)),
        ("oversized decision body", lambda lab, j, a, d: lab.expect(lab.http.post(
            f"/jobs/{j}/decision", headers={**a, "Content-Type": "application/json"},
            content=b'{"continue": true, "best_epoch": 1, "x": "' + b"a" * (1 << 20) + b'"}'),
            413)),
        ("deep decision body", lambda lab, j, a, d: lab.expect(lab.http.post(
            f"/jobs/{j}/decision", headers={**a, "Content-Type": "application/json"},
            content=b"[" * 30_000 + b"]" * 30_000), 400, 422)),
        ("decision with a bool epoch", lambda lab, j, a, d: lab.expect(lab.http.post(
            f"/jobs/{j}/decision", headers=a, json={"continue": True, "best_epoch": True}),
            422)),
        ("decision epoch 10^30", lambda lab, j, a, d: lab.expect(lab.http.post(
            f"/jobs/{j}/decision", headers=a, json={"continue": True, "best_epoch": 10**30}),
            422)),
        ("decision not awaited", lambda lab, j, a, d: lab.expect(lab.http.post(
            f"/jobs/{j}/decision", headers=a, json={"continue": True, "best_epoch": 1}), 409)),
        ("result before the end", lambda lab, j, a, d: lab.expect(
            lab.http.get(f"/jobs/{j}/result", headers=a), 409)),
        ("traversal in a result file", lambda lab, j, a, d: lab.expect(
            lab.http.get(f"/jobs/{j}/result/files/..%2F..%2Fjobs.sqlite3", headers=a), 404)),
        ("query set of an unfinished job", lambda lab, j, a, d: lab.expect(
            lab.http.post(f"/jobs/{j}/queries", headers=a), 409)),
        ("traversal as a query id", lambda lab, j, a, d: lab.expect(
            lab.http.get(f"/jobs/{j}/queries/..%2F..%2Fsecret", headers=a), 404)),
    ]
    return [Case(f"chunks: {label}", case(fn)) for label, fn in specs]


def check_bytes(lab: Lab, job: str, kind: str, name: str, data: bytes) -> None:
    stored = lab.service.data_dir / "jobs" / job / kind / name
    if stored.read_bytes() != data:
        raise Defect(f"{kind}/{name} of job {job} changed after finalize")


def auth_cases() -> list[Case]:
    def run(lab: Lab) -> None:
        owner, _owner_auth = lab.new_job()
        _other, other_auth = lab.new_job()
        paths = [("GET", f"/jobs/{owner}"), ("GET", f"/jobs/{owner}/artifacts/bundle"),
                 ("POST", f"/jobs/{owner}/start"), ("GET", f"/jobs/{owner}/validation-loss"),
                 ("GET", f"/jobs/{owner}/result"), ("POST", f"/jobs/{owner}/cancel"),
                 ("GET", f"/jobs/{owner}/refresh"), ("POST", f"/jobs/{owner}/refresh"),
                 ("GET", f"/jobs/{owner}/queries"), ("DELETE", f"/jobs/{owner}")]
        for method, path in paths:
            lab.expect(lab.http.request(method, path), 401)
            lab.expect(lab.http.request(method, path, headers=other_auth), 403)
            lab.expect(lab.http.request(method, path, headers={
                "Authorization": "Bearer forged"}), 403)
            lab.expect(lab.http.request(method, path, headers={
                "Authorization": "Basic dXNlcjpwdw=="}), 401)

    def unknown(lab: Lab) -> None:
        _job, auth = lab.new_job()
        lab.expect(lab.http.get(f"/jobs/{'0' * 32}", headers=auth), 404)
        lab.expect(lab.http.get(f"/jobs/{'a' * 5000}", headers=auth), 404)
        lab.expect(lab.http.get("/jobs/..%2F..%2Fetc%2Fpasswd", headers=auth), 404)

    def long_token(lab: Lab) -> None:
        job, _auth = lab.new_job()
        lab.expect(lab.http.get(f"/jobs/{job}", headers={
            "Authorization": "Bearer " + "a" * 30_000}), 403)

    return [Case("auth: every endpoint, foreign/forged/missing/basic", run),
            Case("auth: unknown and traversing job ids", unknown),
            Case("auth: 30 kB token", long_token)]


def artifact_cases() -> list[Case]:
    """Bits flipped in every artifact kind (manifest checksum recomputed), truncations,
    a secret key in disguise, a production claim over insecure-ring files."""
    def flipped(kind: str, name: str, offset: int, bit: int = 0x40,
                truncate: bool = False) -> Callable[[Lab], None]:
        def run(lab: Lab) -> None:
            job, auth = lab.new_job()
            data = bytearray(lab.hospital.file(kind, name))
            if truncate:
                data = data[:len(data) // 2]
            else:
                data[offset] ^= bit
            manifest = lab.hospital.manifest(kind)
            manifest["files"][name] = {**manifest["files"][name], "sha256": sha(bytes(data)),
                                       "bytes": len(data)}
            if kind == "dataset":
                lab.upload(job, auth, "bundle")
            refusal = lab.upload(job, auth, kind, manifest, {name: bytes(data)})
            if refusal is None:  # the parser accepted it at finalize: start must refuse
                if kind == "bundle":
                    lab.upload(job, auth, "dataset")
                refusal = lab.http.post(f"/jobs/{job}/start", headers=auth)
                if refusal.status_code in OK:  # a flip that still parses: the worker's turn
                    lab.http.post(f"/jobs/{job}/cancel", headers=auth)
                    refusal = None
            if refusal is not None:
                lab.expect(refusal, 400)
                if "detail" not in refusal.json():
                    raise Defect("refusal without a message")
            lab.expect(lab.http.delete(f"/jobs/{job}", headers=auth), 200)
        return run

    specs = [("bundle", "public_key.bin", 24), ("bundle", "public_key.bin", 40),
             ("bundle", "public_key.bin", 64), ("bundle", "context.bin", 20),
             ("bundle", "context.bin", 40), ("bundle", "mult_key.bin", 24),
             ("bundle", "mult_key.bin", 40), ("dataset", "train_0000_x_dup.bin", 38),
             ("dataset", "train_0000_x_grad.bin", 20), ("dataset", "val_0000_y0.bin", 36),
             ("dataset", "train_0000_y0.bin", 16)]
    cases = [Case(f"artifact: bit flipped in {name} at byte {offset}",
                  flipped(kind, name, offset), heavy=(kind == "dataset" or n >= 3))
             for n, (kind, name, offset) in enumerate(specs)]
    cases += [Case("artifact: rotation keys with a flipped bit",
                   flipped("bundle", "rotation_keys.bin", 24), heavy=True),
              Case("artifact: truncated public key", flipped("bundle", "public_key.bin", 0,
                                                               truncate=True)),
              Case("artifact: truncated context", flipped("bundle", "context.bin", 0,
                                                            truncate=True)),
              Case("artifact: truncated ciphertext", flipped(
                  "dataset", "val_0000_x_dup.bin", 0, truncate=True), heavy=True)]

    def disguised_secret(lab: Lab) -> None:
        job, auth = lab.new_job()
        secret = (lab.hospital.root / "secret" / "secret_key.bin").read_bytes()
        manifest = lab.hospital.manifest("bundle")
        manifest["files"]["public_key.bin"] = {"sha256": sha(secret), "bytes": len(secret)}
        refusal = lab.upload(job, auth, "bundle", manifest, {"public_key.bin": secret})
        if refusal is None or "secret key" not in refusal.json().get("detail", ""):
            raise Defect("a secret key disguised as the public key was not refused")
        lab.expect(refusal, 400)

    def production_claim(lab: Lab) -> None:
        job, auth = lab.new_job()
        bundle, dataset = lab.hospital.manifest("bundle"), lab.hospital.manifest("dataset")
        claimed = PRODUCTION.with_bootstrap_slots(tuple(bundle["params"]["bootstrap_slots"]))
        bundle.update(params=claimed.to_dict(), params_fingerprint=claimed.fingerprint())
        dataset["params_fingerprint"] = claimed.fingerprint()
        dataset["plan"]["slots"] = claimed.slots
        refusal = lab.upload(job, auth, "bundle", bundle)  # refused at the context's finalize
        if refusal is None:
            lab.upload(job, auth, "dataset", dataset)
            refusal = lab.http.post(f"/jobs/{job}/start", headers=auth)  # else at start
        lab.expect(refusal, 400)
        if "ring dimension" not in refusal.json()["detail"]:
            raise Defect(f"unclear refusal: {refusal.text[:200]}")

    return cases + [Case("artifact: secret key disguised as the public key", disguised_secret),
                    Case("artifact: production claim over insecure-ring files",
                         production_claim)]


def quota_cases(lab_factory: Callable[[list[str]], Lab]) -> list[Case]:
    """Floods against a second service with tight quotas (the main one stays generous)."""
    def flood_creations(_lab: Lab) -> None:
        lab = lab_factory(["create_burst=5", "create_rate_per_s=0.01"])
        answers = [lab.http.post("/jobs").status_code for _ in range(12)]
        if answers[:5] != [201] * 5 or set(answers[5:]) != {429}:
            raise Defect(f"job-creation flood answered {answers}")

    def flood_token(_lab: Lab) -> None:
        lab = lab_factory(["token_burst=20", "token_rate_per_s=0.5"])
        job, auth = lab.new_job()
        other, other_auth = lab.new_job()
        answers = [lab.http.get(f"/jobs/{job}", headers=auth).status_code for _ in range(40)]
        if answers[:20] != [200] * 20 or 429 not in answers[20:]:
            raise Defect(f"token flood answered {answers}")
        lab.expect(lab.http.get(f"/jobs/{other}", headers=other_auth), 200)  # unaffected

    def live_jobs(_lab: Lab) -> None:
        lab = lab_factory(["max_live_jobs=3"])
        answers = [lab.http.post("/jobs").status_code for _ in range(5)]
        if answers != [201, 201, 201, 429, 429]:
            raise Defect(f"live-job limit answered {answers}")

    def disk_bound(_lab: Lab) -> None:
        lab = lab_factory([f"max_total_bytes={160 << 20}"])
        first, first_auth = lab.new_job()
        lab.expect(lab.manifest(first, first_auth, "bundle", lab.hospital.manifest("bundle")),
                   200)
        second, second_auth = lab.new_job()
        lab.expect(lab.manifest(second, second_auth, "bundle",
                                lab.hospital.manifest("bundle")), 413)

    return [Case("quota: job-creation flood", flood_creations),
            Case("quota: request flood on one token", flood_token),
            Case("quota: live-job limit", live_jobs),
            Case("quota: global disk bound", disk_bound)]


def fault_cases() -> list[Case]:
    def interrupted_upload(lab: Lab) -> None:
        client = HospitalClient(lab.service.url, progress=False)
        client.create_job()
        client.upload_dir("bundle", lab.hospital.bundle, max_chunks=3)
        lab.service.stop(signal.SIGKILL)  # the web process dies mid-upload
        lab.service.start()
        client.upload_dir("bundle", lab.hospital.bundle)  # resumes
        if not client.artifact_status("bundle")["complete"]:
            raise Defect("upload did not resume after a service kill")
        client.delete()

    def worker_killed(lab: Lab) -> None:
        client = HospitalClient(lab.service.url, progress=False)
        client.create_job()
        client.upload_dir("bundle", lab.hospital.bundle)
        client.upload_dir("dataset", lab.hospital.dataset)
        client.start()
        job_dir = lab.service.data_dir / "jobs" / client.job_id
        deadline = time.monotonic() + 120
        while not (job_dir / "worker.pid").exists() or client.status()["steps"] < 1:
            if time.monotonic() > deadline:
                raise Defect("the job never made a step")
            if client.status()["state"] == "awaiting_decision":
                break
            time.sleep(0.2)
        os.kill(int((job_dir / "worker.pid").read_text()), signal.SIGKILL)  # mid-epoch
        lab.service.stop()  # and the service restarts while the worker is dead
        lab.service.start()
        final = client.answer_decisions(lab.hospital.judge(), poll_s=0.3, timeout_s=300)
        if final["state"] != "finished" or final["restarts"] < 1:
            raise Defect(f"killed job ended {final['state']} with {final['restarts']} restarts")
        client.delete()

    return [Case("fault: service SIGKILLed mid-upload, restarted, upload resumed",
                 interrupted_upload, heavy=True),
            Case("fault: worker SIGKILLed mid-epoch + service restart", worker_killed,
                 heavy=True)]


def catalogue(lab_factory: Callable[[list[str]], Lab], quick: bool) -> list[Case]:
    from hostile_round2 import round2_cases

    cases = (manifest_cases() + chunk_cases() + auth_cases() + artifact_cases()
             + quota_cases(lab_factory) + fault_cases() + round2_cases(lab_factory))
    return [c for c in cases if not (quick and c.heavy)]


# ---- canaries: jobs that must come out of all of this unchanged ------------------------------
@dataclass
class Canary:
    client: HospitalClient
    state: str
    files: dict[str, str]  # path relative to the data dir -> sha256


def make_canaries(lab: Lab, train: bool) -> list[Canary]:
    canaries = []
    uploaded = HospitalClient(lab.service.url, progress=False)
    uploaded.create_job()
    uploaded.upload_dir("bundle", lab.hospital.bundle)
    uploaded.upload_dir("dataset", lab.hospital.dataset)
    canaries.append(uploaded)
    if train:
        trained = HospitalClient(lab.service.url, progress=False)
        trained.create_job()
        trained.upload_dir("bundle", lab.hospital.bundle)
        trained.upload_dir("dataset", lab.hospital.dataset)
        trained.start()
        trained.answer_decisions(lab.hospital.judge(), poll_s=0.3, timeout_s=600)
        canaries.append(trained)
    return [Canary(c, c.status()["state"], job_files(lab, c.job_id)) for c in canaries]


def job_files(lab: Lab, job_id: str) -> dict[str, str]:
    root = lab.service.data_dir
    return {str(p.relative_to(root)): sha(p.read_bytes())
            for p in sorted((root / "jobs" / job_id).rglob("*.bin"))
            if "checkpoints" not in p.parts and "decisions" not in p.parts}


def canary_problems(lab: Lab, canaries: list[Canary], deep: bool) -> list[str]:
    problems = []
    for canary in canaries:
        status = canary.client.status()
        if status["state"] != canary.state:
            problems.append(f"canary {canary.client.job_id} is {status['state']}")
        for kind in ("bundle", "dataset"):
            if not canary.client.artifact_status(kind)["complete"]:
                problems.append(f"canary {canary.client.job_id}: {kind} no longer complete")
        if deep and job_files(lab, canary.client.job_id) != canary.files:
            problems.append(f"canary {canary.client.job_id}: stored files changed")
        if deep and canary.state == "finished":
            with tempfile.TemporaryDirectory() as tmp:
                canary.client.fetch_result(Path(tmp))  # SHA-256 checked per file
    return problems


# ---- the run ----------------------------------------------------------------------------------
def run(quick: bool = False, workdir: Path | None = None, log: Callable[[str], None] = print,
        limits: list[str] | None = None,
        select: Callable[[Case], bool] | None = None) -> dict:
    """Replay the catalogue (or the cases `select` keeps); returns the report."""
    owned = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="mbt-hostile-"))
    services: list[LocalService] = []

    def lab_factory(extra: list[str]) -> Lab:
        service = hostile_service(root / f"cloud{len(services)}", extra).start()
        services.append(service)
        return Lab(service, hospital, root)

    try:
        started = time.monotonic()
        hospital = make_hospital(root / "hospital")
        lab = lab_factory(limits or ["create_burst=10000", "token_burst=100000",
                                    "failed_auth_burst=100000"])
        canaries = make_canaries(lab, train=not quick)
        cases = [c for c in catalogue(lab_factory, quick) if select is None or select(c)]
        defects: list[str] = []
        handled = 0
        for case in cases:
            lab.statuses.clear()
            found: list[str] = []
            try:
                case.run(lab)
            except Defect as exc:
                found.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - anything unexpected is a defect
                found.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            # 507 (disk full) is an answer, not a failure; the cases expect it where it fits
            server_errors = [s for s in lab.statuses if s >= 500 and s != 507]
            if server_errors:
                found.append(f"server error {server_errors}")
            if not lab.service.alive():
                found.append("the service died")
                lab.service.start()
            found += canary_problems(lab, canaries, deep=False)
            handled += not found
            defects += [f"{case.name}: {problem}" for problem in found]
            log(f"{'ok  ' if not found else 'FAIL'} {case.name}")
        final = canary_problems(lab, canaries, deep=True)
        lost = bool(final)
        defects += [f"after all cases: {p}" for p in final]
        summary = (f"{len(cases)} tried, {handled} handled, {len(defects)} defects; "
                   f"data lost: {'yes' if lost else 'no'}")
        from hostile_round2 import MEASURED

        return {"tried": len(cases), "handled": handled, "defects": defects,
                "data_lost": lost, "summary": summary, "measured": dict(MEASURED),
                "seconds": round(time.monotonic() - started, 1)}
    finally:
        for service in services:
            service.stop()
            service.kill_workers()
        if owned:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="Leave out the cases that train or upload the rotation keys.")
    parser.add_argument("--json", type=Path, default=None, help="Write the report here.")
    args = parser.parse_args()
    report = run(quick=args.quick)
    for defect in report["defects"]:
        print("DEFECT", defect)
    print(report["summary"], f"({report['seconds']} s)")
    for name, value in report["measured"].items():
        print(name, json.dumps(value))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if not report["defects"] else 1


if __name__ == "__main__":
    sys.exit(main())
