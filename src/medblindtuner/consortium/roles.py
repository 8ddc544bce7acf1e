"""The consortium's roles over the service, one process per role (`medblindtuner consortium
create | settings | keys | refresh | bundle | train | cloud-train`):

    founder   create: a consortium of n on the service; one member file per hospital
              (service address, consortium id, that hospital's token) to hand over privately
    hospital  settings: its side of the settings rounds (`relayed_settings`); saves its
              sealing key, the agreed plan, its scaled rows, their place in the union and the
              preconditioner in its state folder, where the later roles find them
    hospital  keys: roster + every key round; saves its sealing key, roster, secret share and
              the joint public key in its own state folder (0700)
    hospital  refresh: answers the cloud's next joint refreshes with its `MemberRefresher`
              (ledger in the state folder), from the saved share
    hospital  train: sends its rows under the joint key, answers the cloud's refreshes and
              epochs (ledger, judge), saves the model its judge chose
    cloud     bundle: reads the rounds through the service's store, writes the joint public
              bundle (`JointKeys.save_public_bundle`)
    cloud     cloud-train: trains the union from the service's store (`train_over_relay`)

Every role after `settings` needs the agreed public plan (a `TrainingPlan` JSON, by default
the one `settings` saved): its rotations decide the key rounds, its job tag the refreshes. A
hospital's role killed midway resumes when the same command runs again: every message it
posts is kept in its state folder first and posted again as kept (`journal`), its key
ceremony, ledger and judge persist there (`keys`, `train`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
from nacl.public import PrivateKey

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.he.params import HOSPITAL, CkksParams, params_for_mode
from medblindtuner.he.threshold import (
    PARTY_STATE,
    ThresholdParty,
    joint_context,
    joint_params,
)
from medblindtuner.he.threshold_progress import resume_party
from medblindtuner.training.plan import TrainingPlan

from .agreement import AgreedSettings
from .ceremony import JOINT_KEYS_DIR, JointKeys, key_files_in, key_schedule
from .client import WAIT_TIMEOUT_S, ConsortiumClient
from .data import Ownership
from .journal import JournaledClient, PostJournal, private_dir, write_private
from .member import ConsortiumMember
from .refresher import MemberRefresher
from .relayed_settings import OWNERSHIP, PLAN, PRECONDITIONER, ROWS, agree_over_relay
from .relayed_training import (
    JointEncryptor,
    TrainingAnswers,
    post_last_share_again,
    rows_topic,
    send_rows,
    train_over_relay,
)
from .remote import (
    RemoteMailbox,
    answer_key_rounds,
    assemble_joint_keys,
    exchange_roster,
    serve_refreshes,
)
from .sealing import Roster

MEMBER_FORMAT = "medblindtuner-consortium-member/1"
SEALING_KEY, ROSTER, PARTY_DIR, LEDGER_DIR = ("sealing_key.bin", "roster.json", "party",
                                              "refreshes")
PARTY_ROUNDS = ("public-key", "relin-", "automorphisms-")  # kept by the party's progress
CEREMONY_DIR, POSTED_DIR, TRAINING_DIR, KEYS_JOURNAL = "ceremony", "posted", "training", "keys"


class RoleError(MedBlindTunerError, RuntimeError):
    """A role cannot run: a missing or foreign member file, state folder or plan."""


def load_plan(path: Path) -> TrainingPlan:
    try:
        return TrainingPlan.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RoleError(f"{path}: not a training plan ({exc})") from exc


def consortium_params(plan: TrainingPlan, insecure: bool) -> CkksParams:
    """The joint parameters of refresh mode "hospital" for `plan` (as `consortium.run`)."""
    params = params_for_mode(HOSPITAL, insecure=insecure)
    return joint_params(params.with_bootstrap_slots(plan.bootstrap_slots))


# ---- founder -----------------------------------------------------------------------------
def create(service: str, n_hospitals: int, out: Path) -> list[Path]:
    """A consortium on `service`; writes `hospital-<i>.json` (mode 0600) per hospital."""
    created = ConsortiumClient.create(service, n_hospitals)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for index, token in enumerate(created["tokens"]):
        path = out / f"hospital-{index}.json"
        path.touch(mode=0o600)
        path.write_text(json.dumps({"format": MEMBER_FORMAT, "service": service,
                                    "consortium_id": created["consortium_id"],
                                    "index": index, "token": token}))
        paths.append(path)
    return paths


def client_of(member_file: Path, journal: Path | None = None,
              kept_elsewhere: tuple[str, ...] = ()) -> ConsortiumClient:
    """The member file's client; with `journal` (a folder of this hospital's state), every
    message it posts is kept there first and posted again as kept (`JournaledClient`), but
    the rounds `kept_elsewhere` (whose maker keeps them)."""
    try:
        member = json.loads(Path(member_file).read_text())
        if member.get("format") != MEMBER_FORMAT:
            raise ValueError(f"format {member.get('format')!r}")
        found = (member["service"], member["consortium_id"], member["token"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RoleError(f"{member_file}: not a consortium member file ({exc})") from exc
    if journal is None:
        return ConsortiumClient(*found)
    return JournaledClient(*found, PostJournal(journal), kept_elsewhere)


# ---- hospital ----------------------------------------------------------------------------
def settings(member_file: Path, state: Path, shard, n_classes: int,  # noqa: ANN001
             insecure: bool, pca_dims: int | None = None, weight_decay: float | None = None,
             epochs: int | None = None, timeout_s: float = WAIT_TIMEOUT_S) -> AgreedSettings:
    """This hospital's side of the settings rounds (`relayed_settings.agree_over_relay`):
    its sealing key saved first (the one `keys` reuses), every message kept before it is
    posted (`posted/settings/`), so the same command resumes after a kill; the agreed plan,
    its scaled rows, their place in the union and the preconditioner land in `state`."""
    private_dir(state)
    client = client_of(member_file, state / POSTED_DIR / "settings")
    return agree_over_relay(client, _sealing_key(state), state, shard, n_classes, insecure,
                            pca_dims, weight_decay, epochs, timeout_s)


def agreed_inputs(state: Path) -> dict[str, Any]:
    """What `settings` left in `state` for the later roles: plan and rows paths, offsets,
    the union's counts, the preconditioner (refused, with what to run, if missing)."""
    try:
        owned = json.loads((state / OWNERSHIP).read_text())
        return {"plan": state / PLAN, "rows": state / ROWS,
                "offsets": (int(owned["train_offset"]), int(owned["val_offset"])),
                "counts": (int(owned["n_train"]), int(owned["n_val"])),
                "preconditioner": np.load(state / PRECONDITIONER)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RoleError(f"{state}: no agreed settings; run `medblindtuner consortium "
                        f"settings` first, or give the plan, rows, offsets and counts "
                        f"({exc})") from exc


def keys(member_file: Path, state: Path, plan: TrainingPlan, insecure: bool,
         timeout_s: float = WAIT_TIMEOUT_S) -> dict[str, Any]:
    """Roster and key rounds for this hospital; saves its state. Returns the roster's
    fingerprints (compare them out of band) and the joint key's tag.

    Resumable: the sealing key is saved (0600) before its public half is posted, the share and
    every key round's answer before they are posted (`ceremony/`, `ThresholdParty.
    keep_progress`) and every other message posted is kept (`posted/keys/`: the roster's,
    the attestations; the key shares are not copied twice), so the same command run again
    after a kill goes on with the same share and posts the same bytes. The party saved and
    `ceremony/` deleted, the ceremony is over (then `posted/keys/`); run again after that,
    `keys` only reads back what it saved."""
    if (state / PARTY_DIR / PARTY_STATE).exists() and not (state / CEREMONY_DIR).exists():
        shutil.rmtree(state / POSTED_DIR / KEYS_JOURNAL, ignore_errors=True)  # killed before
        party, _key, roster = _member_state(member_file, state, plan, insecure)[2:]
    else:
        private_dir(state)
        client = client_of(member_file, state / POSTED_DIR / KEYS_JOURNAL, PARTY_ROUNDS)
        party, roster = _key_ceremony(client, state, plan, insecure, timeout_s)
    return {"index": party.index, "joint_tag": party.joint_tag,
            "fingerprints": [roster.fingerprint(i) for i in range(len(roster.public_keys))]}


def _sealing_key(state: Path) -> PrivateKey:
    """This hospital's sealing key: the saved one, or a new one saved (0600) first."""
    path = state / SEALING_KEY
    if path.exists():
        return PrivateKey(path.read_bytes())
    key = PrivateKey.generate()
    write_private(path, bytes(key))
    return key


def _key_ceremony(client: ConsortiumClient, state: Path, plan: TrainingPlan, insecure: bool,
                  timeout_s: float) -> tuple[ThresholdParty, Roster]:
    """Every key round of this hospital, kept as it goes; then its state saved."""
    params = consortium_params(plan, insecure)
    sealing_key = _sealing_key(state)
    roster = exchange_roster(client, sealing_key, timeout_s)
    context = joint_context(params)
    party = resume_party(state / CEREMONY_DIR, client.consortium_id, client.index,
                         client.n_hospitals, context)
    schedule = key_schedule(context, params, plan.rotation_indices,
                            plan.kernel_rotation_indices)
    answer_key_rounds(party, client, schedule, sealing_key, roster, timeout_s)
    (state / ROSTER).write_text(json.dumps({"job_id": roster.job_id, "public_keys": [
        k.hex() for k in roster.public_keys]}))
    party.save(state / PARTY_DIR)  # party.json last: the ceremony is over
    shutil.rmtree(state / CEREMONY_DIR)  # its share copy: the saved party holds the share
    shutil.rmtree(state / POSTED_DIR / KEYS_JOURNAL)  # all posted; never posted again
    with suppress(OSError):
        (state / POSTED_DIR).rmdir()  # if empty
    return party, roster


def restore(state: Path, params: CkksParams) -> tuple[ThresholdParty, PrivateKey, Roster]:
    """This hospital's saved party, sealing key and roster (`keys` wrote them)."""
    try:
        saved = json.loads((state / ROSTER).read_text())
        roster = Roster(saved["job_id"], tuple(bytes.fromhex(k) for k in saved["public_keys"]))
        sealing_key = PrivateKey((state / SEALING_KEY).read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RoleError(f"{state}: no saved consortium state; run `keys` first ({exc})") from exc
    return ThresholdParty.restore(state / PARTY_DIR, joint_context(params)), sealing_key, roster


def _member_state(member_file: Path, state: Path, plan: TrainingPlan, insecure: bool
                  ) -> tuple[ConsortiumClient, CkksParams, ThresholdParty, PrivateKey, Roster]:
    """(client, params, party, sealing key, roster) of this hospital, from its member file
    and the state `keys` saved (refused if they are of different hospitals or consortia)."""
    client = client_of(member_file)
    params = consortium_params(plan, insecure)
    party, sealing_key, roster = restore(state, params)
    if (party.job_id, party.index) != (client.consortium_id, client.index):
        raise RoleError(f"{state} is hospital {party.index} of {party.job_id!r}, the member "
                        f"file hospital {client.index} of {client.consortium_id!r}")
    return client, params, party, sealing_key, roster


def refresh(member_file: Path, state: Path, plan: TrainingPlan, insecure: bool, count: int,
            timeout_s: float = WAIT_TIMEOUT_S) -> int:
    """Answer the cloud's next `count` joint refreshes (from the ledger's next index)."""
    params, party = _member_state(member_file, state, plan, insecure)[1:3]
    client = client_of(member_file, state / POSTED_DIR / "refreshes")
    ledger = MemberRefresher(party, params, plan, state / LEDGER_DIR)
    post_last_share_again(ledger, client)
    return serve_refreshes(ledger, client, count, ledger.finished, timeout_s)


def load_rows(path: Path) -> tuple[np.ndarray, ...]:
    """This hospital's rows, scaled as agreed: x_train, y_train, x_val, y_val (.npz)."""
    try:
        with np.load(path) as rows:
            return tuple(np.asarray(rows[k]) for k in ("x_train", "y_train", "x_val", "y_val"))
    except (OSError, KeyError, ValueError) as exc:
        raise RoleError(f"{path}: not a rows file with x_train, y_train, x_val, y_val "
                        f"({exc})") from exc


def train(member_file: Path, state: Path, plan: TrainingPlan, insecure: bool, rows: Path,
          offsets: tuple[int, int], counts: tuple[int, int], out: Path,
          timeout_s: float = WAIT_TIMEOUT_S,
          preconditioner: np.ndarray | None = None) -> dict[str, Any]:
    """This hospital's side of the training: its rows (union rows from `offsets`, of the
    union's `counts`) under the joint key, every refresh and epoch the cloud asks, then the
    model its judge chose, saved to `out` (.npy). Returns its losses and refreshes.

    Resumable: every message is kept before it is posted (`training/<job tag>/posted/`), the
    judge's state and what it shared persist (`training/<job tag>/`), the refreshes in the
    ledger; the same command run again after a kill posts the kept bytes, not new ones (its
    rows are not encrypted anew), and answers as before. Other rows, offsets or counts than
    the first run's are refused."""
    folder = state / TRAINING_DIR / plan.job_tag(consortium_params(plan, insecure))
    _client, params, party, sealing_key, roster = _member_state(member_file, state, plan,
                                                               insecure)
    client = client_of(member_file, folder / POSTED_DIR)
    _same_inputs(folder, rows, offsets, counts)
    shard = load_rows(rows)
    manifest = f"round-{rows_topic(client.index)}-{client.index}"
    if not client.repost(manifest):  # kept: every row was posted before it
        owned = Ownership(offsets[0], len(shard[1]), offsets[1], len(shard[3]))
        send_rows(client, JointEncryptor(params, party.context, party.joint_public_key), plan,
                  owned, shard, *counts, _preconditioner_of(plan, state, preconditioner))
    member = ConsortiumMember(party, sealing_key, roster, RemoteMailbox(client, timeout_s))
    member.attach_plan(plan, counts[1], folder)
    ledger = MemberRefresher(party, params, plan, state / LEDGER_DIR,
                             stopped=lambda: member.judge.stopped)
    weights = TrainingAnswers(member, ledger, client, timeout_s).run()
    np.save(out, weights)
    return {"losses": dict(member.judge.losses), "refreshes": ledger.finished,
            "best_epoch": member.judge.best_epoch}


def _preconditioner_of(plan: TrainingPlan, state: Path,
                       given: np.ndarray | None) -> np.ndarray | None:
    """A preconditioned plan's p (given, else the one `settings` saved); None for a plain
    plan."""
    if not plan.config.preconditioned:
        return None
    return given if given is not None else agreed_inputs(state)["preconditioner"]


def _same_inputs(folder: Path, rows: Path, offsets: tuple[int, int],
                 counts: tuple[int, int]) -> None:
    """Record this training's inputs (first run) or refuse other ones (a restart)."""
    try:
        digest = hashlib.sha256(Path(rows).read_bytes()).hexdigest()
    except OSError as exc:
        raise RoleError(f"{rows}: cannot read the rows ({exc})") from exc
    inputs = {"rows_sha256": digest, "offsets": list(offsets), "counts": list(counts)}
    path = folder / "inputs.json"
    if path.exists():
        if json.loads(path.read_text()) != inputs:
            raise RoleError(f"{folder} is a training of other rows, offsets or counts: this "
                            "hospital already sent those; refused")
        return
    private_dir(folder)
    write_private(path, json.dumps(inputs).encode())


# ---- cloud -------------------------------------------------------------------------------
def store_reader(relay, consortium_id: str, n_parties: int,  # noqa: ANN001 - ConsortiumRelay
                 timeout_s: float) -> Callable[[str], list[bytes]]:
    """`read_round` through the service's store: all n messages of a round, by party."""
    def read_round(name: str) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = relay.read(consortium_id, name)
            if sorted(found) == list(range(n_parties)):
                return [found[i] for i in range(n_parties)]
            if time.monotonic() >= deadline:
                missing = ", ".join(str(i) for i in range(n_parties) if i not in found)
                raise RoleError(f"round {name!r}: waiting for hospitals {missing}")
            time.sleep(0.05)
    return read_round


@contextmanager
def service_store(data_dir: Path, db_url: str | None = None) -> Iterator[Any]:
    """The service's consortium relay on its store (the cloud operator's side, no HTTP)."""
    from medblindtuner.service.consortia import ConsortiumRelay
    from medblindtuner.service.limits import ServiceConfig
    from medblindtuner.service.store import Store

    config = ServiceConfig(Path(data_dir), db_url)
    store = Store(config.resolved_db_url)
    try:
        yield ConsortiumRelay(config, store)
    finally:
        store.dispose()


def cloud_keys(relay, consortium_id: str, plan: TrainingPlan, insecure: bool,  # noqa: ANN001
               timeout_s: float = WAIT_TIMEOUT_S,
               keys_dir: Path | None = None) -> tuple[JointKeys, int]:
    """The joint keys assembled from the store's rounds (key files in `keys_dir`, else a
    temporary folder), and the consortium's size."""
    from medblindtuner.service.errors import CloudError

    try:
        n = relay.n_parties(consortium_id)
    except CloudError as exc:
        raise RoleError(f"consortium {consortium_id!r}: {exc.message}") from exc
    params = consortium_params(plan, insecure)
    context = joint_context(params)
    schedule = key_schedule(context, params, plan.rotation_indices,
                            plan.kernel_rotation_indices)
    return assemble_joint_keys(context, params, consortium_id, n,
                               store_reader(relay, consortium_id, n, timeout_s), schedule,
                               keys_dir), n


def bundle(data_dir: Path, consortium_id: str, plan: TrainingPlan, insecure: bool, out: Path,
           db_url: str | None = None, timeout_s: float = WAIT_TIMEOUT_S) -> dict[str, Any]:
    """The cloud operator's: the joint public bundle from the service's store."""
    with service_store(data_dir, db_url) as relay:
        joint, _n = cloud_keys(relay, consortium_id, plan, insecure, timeout_s)
        return joint.save_public_bundle(out)


def cloud_train(data_dir: Path, consortium_id: str, plan: TrainingPlan, insecure: bool,
                counts: tuple[int, int], workdir: Path, db_url: str | None = None,
                timeout_s: float = WAIT_TIMEOUT_S) -> dict[str, Any]:
    """The cloud operator's training of the consortium from the service's store
    (`relayed_training.train_over_relay`); resumable from `workdir`."""
    with service_store(data_dir, db_url) as relay:
        with key_files_in(Path(workdir) / JOINT_KEYS_DIR) as key_files:
            joint, _n = cloud_keys(relay, consortium_id, plan, insecure, timeout_s, key_files)
            state = train_over_relay(relay, consortium_id, joint, plan, *counts, workdir,
                                     timeout_s=timeout_s)
    return {"epochs": state.epoch, "best_epoch": state.best_epoch, "steps": state.steps}
