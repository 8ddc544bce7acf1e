"""Round two of the hostile catalogue (issue 26): the cases a second, outside catalogue found.

Imported by `hostile.py` (its `catalogue`); each case runs against the same real service and
hospital artifacts and is judged the same way (expected statuses only, no 5xx, the service
alive, the canaries untouched). A full disk is the one 5xx that is an answer: 507, with a
message, and nothing half-written recorded.

    no 500   lone-surrogate keys, best_epoch 9e999, FastAPI's own 422s as {"detail": str},
             DELETE during finalize and during concurrent chunk writes (404/409), disk full
             at POST /jobs, while writing a chunk and at finalize (507, then the retry works)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from hostile import CHUNK, OK, Case, Defect, Lab, sha

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


def round2_cases(lab_factory: Callable[..., Lab]) -> list[Case]:
    return no_500_cases(lab_factory)


__all__ = ["round2_cases", "sha"]
