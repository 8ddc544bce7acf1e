"""Round two of the hostile catalogue (issue 26): the cases a second, outside catalogue found.

Imported by `hostile.py` (its `catalogue`); each case runs against the same real service and
hospital artifacts and is judged the same way (expected statuses only, no 5xx, the service
alive, the canaries untouched). A full disk is the one 5xx that is an answer: 507, with a
message, and nothing half-written recorded.

    hospital a refusal ends a job's questions for good (re-runs of fetch), malformed epochs,
             a loss under the cloud's own context, a parser length bomb, the decryption
             budget (the plan's epochs) across restarts
    no 500   lone-surrogate keys, best_epoch 9e999, FastAPI's own 422s as {"detail": str},
             DELETE during finalize and during concurrent chunk writes (404/409), disk full
             at POST /jobs, while writing a chunk and at finalize (507, then the retry works)
    context  a context made with other depth, scaling, key distribution, first modulus,
             level budget, or HEStd_NotSet with a 1838-bit modulus, than its manifest
             declares: 400 at the context's finalize, naming the mismatch; keys made for
             another known level budget: 400 at start (a trial bootstrap)
    exhaustion  6 parser bombs finalized and 8 starts of one job at once (one validator at
             a time, /healthz < 1 s throughout, measured), forged X-Forwarded-For, failed
             authentications charged, reservations without bytes expiring, per-client job
             cap and idle-job expiry
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hostile import CHUNK, OK, Case, Defect, Lab, sha

from medblindtuner.hospital.client import HospitalClient

GONE = (404, 409)


def detail_is_text(lab: Lab, response, *allowed: int) -> None:  # noqa: ANN001 - httpx
    """The documented refusal body: `{"detail": str}`."""
    lab.expect(response, *allowed)
    body = response.json()
    if set(body) != {"detail"} or not isinstance(body["detail"], str):
        raise Defect(f"refusal body is not {{'detail': str}}: {response.text[:200]}")


# ---- family 2: no HTTP 500 ---------------------------------------------------------------------
def no_500_cases(lab_factory: Callable[..., Lab]) -> list[Case]:
    def decision(lab: Lab, body: bytes):  # noqa: ANN202 - httpx response
        job, auth = lab.new_job()
        return lab.http.post(f"/jobs/{job}/decision", content=body,
                             headers={**auth, "Content-Type": "application/json"})

    def lone_surrogate(lab: Lab) -> None:
        for body in (b'{"\\ud800": 1}', b'{"continue": true, "best_epoch": 1, "\\udfff": 2}',
                     b'{"continue": "\\ud800", "best_epoch": 1}'):
            detail_is_text(lab, decision(lab, body), 422)

    def huge_float(lab: Lab) -> None:
        for body in (b'{"continue": true, "best_epoch": 9e999}',
                     b'{"continue": true, "best_epoch": -9e999}',
                     b'{"continue": true, "best_epoch": NaN}',
                     b'{"continue": true, "best_epoch": 1, "epoch": 1e3}'):
            detail_is_text(lab, decision(lab, body), 422)

    def fastapi_422(lab: Lab) -> None:
        job, auth = lab.new_job()
        for body in (b'{"continue": "yes", "best_epoch": 1}', b"[]", b"{", b"null",
                     b'{"continue": true}'):
            detail_is_text(lab, lab.http.post(f"/jobs/{job}/decision", content=body,
                                              headers={**auth,
                                                       "Content-Type": "application/json"}),
                           422)
        detail_is_text(lab, lab.chunk(job, auth, "bundle", "context.bin", -1, b"x"), 422)
        detail_is_text(lab, lab.chunk(job, auth, "bundle", "context.bin", "abc", b"x"), 422)

    def delete_during_finalize(lab: Lab) -> None:
        job, auth = lab.new_job()
        lab.expect(lab.manifest(job, auth, "bundle", lab.hospital.manifest("bundle")), 200)
        data = lab.hospital.file("bundle", "public_key.bin")
        for index in range(-(-len(data) // CHUNK)):
            lab.expect(lab.chunk(job, auth, "bundle", "public_key.bin", index,
                                 data[index * CHUNK:(index + 1) * CHUNK]), *OK)
        answers: list = []
        finalizing = threading.Thread(target=lambda: answers.append(
            lab.finalize(job, auth, "bundle", "public_key.bin")))
        finalizing.start()
        time.sleep(0.3)  # the validator subprocess is parsing the key now
        lab.expect(lab.http.delete(f"/jobs/{job}", headers=auth), 200)
        finalizing.join(120)
        detail_or_ok(lab, answers[0])
        lab.expect(lab.http.get(f"/jobs/{job}", headers=auth), 404)
        if (lab.service.data_dir / "jobs" / job).exists():
            raise Defect("the deleted job's folder came back")

    def delete_during_chunks(lab: Lab) -> None:
        job, auth = lab.new_job()
        lab.expect(lab.manifest(job, auth, "bundle", lab.hospital.manifest("bundle")), 200)
        data = lab.hospital.file("bundle", "rotation_keys.bin")
        n = -(-len(data) // CHUNK)
        answers: list = []

        def writer(indices: range) -> None:
            for index in indices:
                answers.append(lab.chunk(job, auth, "bundle", "rotation_keys.bin", index,
                                         data[index * CHUNK:(index + 1) * CHUNK]))

        writers = [threading.Thread(target=writer, args=(range(k, n, 2),)) for k in (0, 1)]
        for thread in writers:
            thread.start()
        time.sleep(0.5)
        lab.expect(lab.http.delete(f"/jobs/{job}", headers=auth), 200)
        for thread in writers:
            thread.join(120)
        for answer in answers:
            detail_or_ok(lab, answer)
        time.sleep(0.2)
        if (lab.service.data_dir / "staging" / job).exists():
            raise Defect("the deleted job's staging folder came back")

    def disk_full(_lab: Lab) -> None:
        armed = "disk.job@2:enospc,disk.chunk@2:enospc,disk.finalize@1:enospc"
        os.environ["MEDBLINDTUNER_FAILPOINT"] = armed
        try:
            lab = lab_factory([])
        finally:
            del os.environ["MEDBLINDTUNER_FAILPOINT"]
        first = lab.expect(lab.http.post("/jobs"), 201).json()
        detail_is_text(lab, lab.http.post("/jobs"), 507)  # the second job: disk full
        if len(list((lab.service.data_dir / "jobs").iterdir())) != 1:
            raise Defect("a job refused for a full disk left a folder behind")
        job, auth = first["job_id"], {"Authorization": f"Bearer {first['token']}"}
        lab.expect(lab.manifest(job, auth, "bundle", lab.hospital.manifest("bundle")), 200)
        data = lab.hospital.file("bundle", "public_key.bin")
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
        lab.expect(lab.chunk(job, auth, "bundle", "public_key.bin", 0, chunks[0]), 200)
        if len(chunks) > 1:
            detail_is_text(lab, lab.chunk(job, auth, "bundle", "public_key.bin", 1,
                                          chunks[1]), 507)
            received = lab.http.get(f"/jobs/{job}/artifacts/bundle", headers=auth).json()
            if received["files"]["public_key.bin"]["received"] != [0]:
                raise Defect("a chunk refused for a full disk was recorded")
            for index, chunk in enumerate(chunks[1:], start=1):
                lab.expect(lab.chunk(job, auth, "bundle", "public_key.bin", index, chunk), 200)
        detail_is_text(lab, lab.finalize(job, auth, "bundle", "public_key.bin"), 507)
        status = lab.http.get(f"/jobs/{job}/artifacts/bundle", headers=auth).json()
        if status["files"]["public_key.bin"]["complete"]:
            raise Defect("a finalize refused for a full disk was recorded")
        lab.expect(lab.finalize(job, auth, "bundle", "public_key.bin"), 200)  # the retry
        if any(s >= 500 and s != 507 for s in lab.statuses):
            raise Defect(f"server errors {lab.statuses}")

    return [Case("no500: lone-surrogate keys in a decision body", lone_surrogate),
            Case("no500: best_epoch 9e999 and other non-finite numbers", huge_float),
            Case("no500: FastAPI's own 422 bodies are {detail: str}", fastapi_422),
            Case("no500: DELETE during finalize", delete_during_finalize),
            Case("no500: DELETE during concurrent chunk writes", delete_during_chunks),
            Case("no500: disk full at POST /jobs, chunk and finalize (507)", disk_full)]


def detail_or_ok(lab: Lab, response) -> None:  # noqa: ANN001 - httpx response
    """Done before the delete (200), or refused because the job is gone (404/409)."""
    if response.status_code in OK:
        return
    detail_is_text(lab, response, *GONE)


# ---- family 1: the hospital's judge leaks no bit beyond the plan ------------------------------
def judge_cases() -> list[Case]:
    """The hospital's judge fed what a malicious cloud sends (`answer_cloud`: the epoch header
    and the ciphertext bytes exactly as received). `tests/test_malicious_cloud.py` runs the
    same questions over HTTP against `hospital fetch` processes."""
    import numpy as np

    from medblindtuner.he.ciphertexts import ciphertext_to_bytes
    from medblindtuner.he.params import data_level
    from medblindtuner.hospital.crypto import HospitalJudge, JudgeRefusal

    def judge_at(lab: Lab, name: str) -> HospitalJudge:
        state = lab.tmp / "judges" / f"{name}.json"
        state.parent.mkdir(parents=True, exist_ok=True)
        hospital = lab.hospital
        return HospitalJudge(hospital.keys, hospital.plan, hospital.n_val, state_path=state)

    def loss_bytes(judge: HospitalJudge, value: float, keys=None) -> bytes:  # noqa: ANN001
        keys = keys or judge.keys
        vector = np.zeros(keys.params.slots)
        vector[0] = value * judge.n_val + judge.padding_loss
        return ciphertext_to_bytes(keys.encrypt(vector, data_level(keys.params)))

    def refused(judge: HospitalJudge, epoch: str | None, data: bytes, expected: str) -> None:
        try:
            judge.answer_cloud(epoch, data)
        except JudgeRefusal as exc:
            if expected not in str(exc):
                raise Defect(f"refusal without {expected!r}: {exc}") from exc
            return
        raise Defect(f"epoch {epoch!r}: answered, expected a refusal ({expected})")

    def rerun_after_refusal(lab: Lab) -> None:
        judge = judge_at(lab, "rerun")
        judge.answer_cloud("1", loss_bytes(judge, 0.3))
        refused(judge, "2", loss_bytes(judge, 7.0), "Brier range")
        for value in (0.1, 0.2, 0.3):  # re-runs of `hospital fetch`: a new judge each
            refused(judge_at(lab, "rerun"), "2", loss_bytes(judge, value), "ended with a")
        if len(judge_at(lab, "rerun").decrypted) != 2:
            raise Defect("a question after the refusal was decrypted")

    def malformed_epochs(lab: Lab) -> None:
        for n, header in enumerate(("abc", "1e3", "-1", "", None, "9" * 30)):
            judge = judge_at(lab, f"epoch{n}")
            refused(judge, header, loss_bytes(judge, 0.3), "not a plain integer")
            if judge_at(lab, f"epoch{n}").refused is None:
                raise Defect("a malformed epoch was not recorded")

    def foreign_context(lab: Lab) -> None:
        from medblindtuner.he.keys import HospitalKeys

        judge = judge_at(lab, "foreign")
        cloud_keys = HospitalKeys.generate(judge.keys.params, [], allow_insecure=True)
        refused(judge, "1", loss_bytes(judge, 0.3, cloud_keys), "refused")
        if not judge_at(lab, "foreign").refused:
            raise Defect("the refusal was not recorded")

    def length_bomb(lab: Lab) -> None:
        import resource

        judge = judge_at(lab, "bomb")
        data = bytearray(loss_bytes(judge, 0.3))
        data[20] ^= 0x40  # a length field: OpenFHE's parser asks for gigabytes
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        refused(judge, "1", bytes(data), "refused")
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        if grown > 256 << 10:  # KiB: the bytes were parsed in the limited child only
            raise Defect(f"the hospital process grew by {grown >> 10} MiB")

    def budget(lab: Lab) -> None:
        judge = judge_at(lab, "budget")
        epochs = judge.plan.config.epochs
        for epoch in range(epochs):  # killed after each decryption, before answering
            judge = judge_at(lab, "budget")
            judge.answer_cloud("1", loss_bytes(judge, 0.3 - 0.01 * epoch))
            judge.answers.clear()
            judge.losses.clear()
            judge._save()
        refused(judge_at(lab, "budget"), "1", loss_bytes(judge, 0.2), f"allows {epochs}")

    return [Case("hospital: a refusal ends the job's questions (re-runs of fetch)",
                 rerun_after_refusal),
            Case("hospital: X-Epoch abc, 1e3, -1, empty, missing, 30 digits", malformed_epochs),
            Case("hospital: loss ciphertext under the cloud's own context", foreign_context),
            Case("hospital: length-field bomb parsed in a limited child", length_bomb),
            Case("hospital: decryption budget = plan epochs across restarts", budget)]


# ---- family 4: resource exhaustion ---------------------------------------------------------------
MEASURED: dict[str, object] = {}  # numbers the catalogue reports (healthz under a burst)


def validator_processes(service_pid: int) -> int:
    """Validator children of this service alive right now (other services on the machine,
    e.g. a test suite running beside, have their own)."""
    count = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if (parent == service_pid
                    and b"medblindtuner.service.validate" in (proc / "cmdline").read_bytes()):
                count += 1
        except (OSError, ValueError, IndexError):
            pass
    return count


class Watch:
    """Polls /healthz every 0.1 s and counts validator processes while a burst runs."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.latencies: list[float] = []
        self.validators = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import httpx

        while not self.stop.is_set():
            started = time.monotonic()
            try:
                httpx.get(f"{self.lab.service.url}/healthz", timeout=10)
                self.latencies.append(time.monotonic() - started)
            except httpx.HTTPError:
                self.latencies.append(float("inf"))
            self.validators = max(self.validators,
                                  validator_processes(self.lab.service.process.pid))
            time.sleep(0.1)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        self.thread.join()


def exhaustion_cases(lab_factory: Callable[..., Lab]) -> list[Case]:
    def uploaded_job(lab: Lab, flip: bool = False) -> tuple[str, dict]:
        """A job with its whole bundle and dataset sent but public_key.bin not finalized."""
        job, auth = lab.new_job()
        bundle = lab.hospital.manifest("bundle")
        key = bytearray(lab.hospital.file("bundle", "public_key.bin"))
        if flip:
            key[24] ^= 0x40  # a length field: the parser asks for ~2^62 bytes
            bundle["files"]["public_key.bin"] = {"sha256": sha(bytes(key)), "bytes": len(key)}
        lab.expect(lab.manifest(job, auth, "bundle", bundle), 200)
        for index in range(-(-len(key) // CHUNK)):
            lab.expect(lab.chunk(job, auth, "bundle", "public_key.bin", index,
                                 bytes(key[index * CHUNK:(index + 1) * CHUNK])), 200)
        return job, auth

    def burst(lab: Lab) -> None:
        """6 finalizes of bombs in 6 jobs and 8 concurrent starts of one job, at once:
        validators run one at a time (queued), /healthz answers within 1 s throughout."""
        bombs = [uploaded_job(lab, flip=True) for _ in range(6)]
        client = HospitalClient(lab.service.url, progress=False)
        client.create_job()
        client.upload_dir("bundle", lab.hospital.bundle)
        client.upload_dir("dataset", lab.hospital.dataset)
        starter = {"Authorization": f"Bearer {client.token}"}
        answers: list = []
        calls = [lambda j=j, a=a: lab.finalize(j, a, "bundle", "public_key.bin")
                 for j, a in bombs]
        calls += [lambda: lab.http.post(f"/jobs/{client.job_id}/start", headers=starter)] * 8
        threads = [threading.Thread(target=lambda c=c: answers.append(c())) for c in calls]
        with Watch(lab) as watch:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(600)
        finals = [a.status_code for a in answers if "finalize" in str(a.request.url)]
        starts = sorted(a.status_code for a in answers if "start" in str(a.request.url))
        MEASURED["healthz_during_burst"] = {
            "polls": len(watch.latencies), "max_s": round(max(watch.latencies), 3),
            "p50_s": round(sorted(watch.latencies)[len(watch.latencies) // 2], 3),
            "validators_at_once": watch.validators}
        if finals != [400] * 6:
            raise Defect(f"bomb finalizes answered {finals}")
        if starts != [200] + [409] * 7:
            raise Defect(f"8 concurrent starts answered {starts}")
        if watch.validators > 1:
            raise Defect(f"{watch.validators} validators ran at once (limit 1)")
        if max(watch.latencies) > 1.0:
            raise Defect(f"/healthz took {max(watch.latencies):.2f} s during the burst")
        client.cancel()

    def forged_forwarded_for(_lab: Lab) -> None:
        lab = lab_factory(["create_burst=5", "create_rate_per_s=0.01"])
        answers = [lab.http.post("/jobs", headers={"X-Forwarded-For": f"10.0.0.{i}"})
                   .status_code for i in range(12)]
        if answers[:5] != [201] * 5 or set(answers[5:]) != {429}:
            raise Defect(f"forged X-Forwarded-For: creations answered {answers}")

    def failed_auth(_lab: Lab) -> None:
        lab = lab_factory(["failed_auth_burst=20", "failed_auth_rate_per_s=0.05"])
        job, _auth = lab.new_job()
        answers = [lab.http.get(f"/jobs/{job}", headers={"Authorization": f"Bearer x{i}"})
                   .status_code for i in range(40)]
        if answers[:20] != [403] * 20 or set(answers[20:]) != {429}:
            raise Defect(f"1 wrong token after another answered {answers}")

    def expired_reservation(_lab: Lab) -> None:
        lab = lab_factory([f"max_total_bytes={160 << 20}", "upload_reservation_ttl_s=2"])
        first, first_auth = lab.new_job()
        lab.expect(lab.manifest(first, first_auth, "bundle", lab.hospital.manifest("bundle")),
                   200)  # declares ~140 MiB, then sends nothing
        second, second_auth = lab.new_job()
        lab.expect(lab.manifest(second, second_auth, "bundle",
                                lab.hospital.manifest("bundle")), 413)
        time.sleep(3)
        lab.expect(lab.manifest(second, second_auth, "bundle",
                                lab.hospital.manifest("bundle")), 200)

    def client_cap_and_idle_expiry(_lab: Lab) -> None:
        lab = lab_factory(["max_jobs_per_client=3", "idle_job_ttl_s=3"])
        jobs = [lab.new_job() for _ in range(3)]
        lab.expect(lab.http.post("/jobs"), 429)  # one client: 3 jobs at most
        time.sleep(4)  # all three idle beyond the TTL: expired at the next creation
        lab.expect(lab.http.post("/jobs"), 201)
        for job, auth in jobs:
            lab.expect(lab.http.get(f"/jobs/{job}", headers=auth), 404)

    return [Case("exhaustion: bombs + concurrent starts, one validator, healthz < 1 s", burst),
            Case("exhaustion: forged X-Forwarded-For is not believed", forged_forwarded_for),
            Case("exhaustion: failed authentications charged to the caller", failed_auth),
            Case("exhaustion: reservations without bytes expire", expired_reservation),
            Case("exhaustion: per-client job cap, idle jobs expire",
                 client_cap_and_idle_expiry)]


# ---- family 3: lying contexts ------------------------------------------------------------------
def context_cases() -> list[Case]:
    """A context made with other parameters than its bundle manifest declares: refused at its
    finalize with a 400 that names the mismatch (read from the context itself)."""
    from dataclasses import replace

    import openfhe as ofhe

    from medblindtuner.he.params import INSECURE_TEST, PRODUCTION, build_context

    def lie(made_with: Callable[[object], object], declared: Callable[[object], object],
            expected: str) -> Callable[[Lab], None]:
        def run(lab: Lab) -> None:
            manifest = lab.hospital.manifest("bundle")
            genuine = type(INSECURE_TEST).from_dict(manifest["params"])
            context = build_context(made_with(genuine))
            data = ofhe.Serialize(context, ofhe.BINARY)
            claimed = declared(genuine)
            manifest.update(params=claimed.to_dict(), params_fingerprint=claimed.fingerprint())
            manifest["files"]["context.bin"] = {"sha256": sha(data), "bytes": len(data)}
            job, auth = lab.new_job()
            refusal = lab.upload(job, auth, "bundle", manifest, {"context.bin": data})
            if refusal is None:
                raise Defect(f"a context with {expected} was accepted")
            detail_is_text(lab, refusal, 400)
            if expected not in refusal.json()["detail"]:
                raise Defect(f"refusal does not name {expected!r}: {refusal.text[:300]}")
            lab.expect(lab.http.delete(f"/jobs/{job}", headers=auth), 200)
        return run

    def level_budget_lie(lab: Lab) -> None:
        """Keys made for the genuine sparse level budget, the manifests declare another
        known one: only a bootstrap with the declared set-up can tell (at start)."""
        bundle, dataset = lab.hospital.manifest("bundle"), lab.hospital.manifest("dataset")
        genuine = type(INSECURE_TEST).from_dict(bundle["params"])
        other = (1, 1) if tuple(genuine.sparse_level_budget) != (1, 1) else (3, 3)
        claimed = replace(genuine, sparse_level_budget=other)
        bundle.update(params=claimed.to_dict(), params_fingerprint=claimed.fingerprint())
        dataset["params_fingerprint"] = claimed.fingerprint()
        job, auth = lab.new_job()
        for kind, manifest in (("bundle", bundle), ("dataset", dataset)):
            refusal = lab.upload(job, auth, kind, manifest)
            if refusal is not None:
                raise Defect(f"refused before start: {refusal.text[:200]}")
        answer = lab.http.post(f"/jobs/{job}/start", headers=auth)
        if answer.status_code in OK:
            lab.http.post(f"/jobs/{job}/cancel", headers=auth)
            raise Defect("a job whose keys do not fit its declared level budget started")
        detail_is_text(lab, answer, 400)
        if "bootstrapping set-up" not in answer.json()["detail"]:
            raise Defect(f"refusal does not name the set-up: {answer.text[:300]}")
        lab.expect(lab.http.delete(f"/jobs/{job}", headers=auth), 200)

    same = lambda p: p  # noqa: E731 - the honest declaration
    return [
        Case("context: depth 10 declared 24", lie(lambda p: replace(p, depth=10), same,
                                                  "multiplicative depth 10")),
        Case("context: scaling 40 bits declared 50", lie(
            lambda p: replace(p, scaling_bits=40), same, "scaling bits 40")),
        Case("context: uniform ternary key declared sparse", lie(
            lambda p: replace(p, secret_key_dist="UNIFORM_TERNARY"), same,
            "secret-key distribution UNIFORM_TERNARY")),
        Case("context: first modulus 60 bits declared 58", lie(
            lambda p: replace(p, first_mod_bits=60), same, "first modulus of 60 bits")),
        Case("context: level budget (4, 4) declared", lie(
            same, lambda p: replace(p, level_budget=(4, 4)), "level budget [4, 4]")),
        Case("context: HEStd_NotSet 1838-bit ring 2^16 declared production-128", lie(
            lambda p: replace(PRODUCTION, security="HEStd_NotSet", depth=35,
                              bootstrap_slots=p.bootstrap_slots),
            lambda p: PRODUCTION.with_bootstrap_slots(p.bootstrap_slots),
            "security level HEStd_NotSet")),
        Case("context: keys for another known level budget (refused at start)",
             level_budget_lie),
    ]


def round2_cases(lab_factory: Callable[..., Lab]) -> list[Case]:
    return (judge_cases() + no_500_cases(lab_factory) + context_cases()
            + exhaustion_cases(lab_factory))


__all__ = ["round2_cases", "sha"]
