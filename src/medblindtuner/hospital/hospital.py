"""The hospital as an object: one work folder, the workflow in order, nothing rebuilt by hand.

    hospital = Hospital("hospital-job")  # insecure_test_params=True: the tiny test ring
    hospital.prepare(features)          # probe, recipe, plan, range check, scaler (fitted once)
    hospital.generate_keys()            # public bundle + secret key (local/, mode 0600)
    hospital.encrypt_dataset()          # encrypted_dataset/ for the cloud
    judge = hospital.judge()            # answers one early-stopping question per epoch
    weights = hospital.decrypt_result() # after the cloud's result/ is downloaded

`Hospital.open(workdir)` picks a prepared folder up again (the CLI runs one step per command);
`hospital.session.CloudSession` carries its job to a cloud service.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.features.extract import FeatureSet
from medblindtuner.features.preprocess import FeatureScaler
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import BOOTSTRAP, CkksParams, params_for_mode
from medblindtuner.hospital.crypto import (
    HospitalJudge,
    JudgeRefusal,
    decrypt_scores,
    decrypt_weights,
    encrypt_queries,
    write_encrypted_dataset,
)
from medblindtuner.hospital.recipe import Overrides, PreparedData, Recipe, derive_recipe
from medblindtuner.hospital.refresher import HospitalRefresher
from medblindtuner.training.artifacts import EncryptedResult, load_scores
from medblindtuner.training.plain import class_probabilities
from medblindtuner.training.plan import TrainingPlan


class HospitalError(MedBlindTunerError, RuntimeError):
    """A hospital step was asked for before the steps it needs."""


@dataclass(frozen=True)
class HospitalFolder:
    """The hospital work folder's layout, spelled once.

    public_bundle/        uploaded: context + evaluation keys (no secret)
    encrypted_dataset/    uploaded: CKKS ciphertexts of the features and labels
    local/                NEVER uploaded (mode 0700): secret key, scaled features, scaler,
                          the early-stopping judge's answers (judge.json), the refresh
                          ledger and latest answers (refreshes/, refresh mode "hospital")
    plan.json             public training plan, CKKS parameters, recipe
    job.json              service URL, job id and bearer token (mode 0600)
    result/               downloaded encrypted weights
    queries/<id>/         encrypted query sets and their encrypted scores
    """

    root: Path

    @property
    def public_bundle(self) -> Path:
        return self.root / "public_bundle"

    @property
    def encrypted_dataset(self) -> Path:
        return self.root / "encrypted_dataset"

    @property
    def local(self) -> Path:
        return self.root / "local"

    @property
    def secret_key(self) -> Path:
        return self.local / "secret_key.bin"

    @property
    def prepared(self) -> Path:
        return self.local / "prepared.npz"

    @property
    def scaler(self) -> Path:
        return self.local / "scaler.npz"

    @property
    def judge_state(self) -> Path:
        return self.local / "judge.json"

    @property
    def refresh_state(self) -> Path:
        return self.local / "refreshes"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def result(self) -> Path:
        return self.root / "result"

    def query(self, query_id: str) -> Path:
        return self.root / "queries" / query_id


def ckks_params(insecure_test_params: bool, refresh: str = BOOTSTRAP) -> CkksParams:
    """The CKKS parameters of a security level and refresh mode: production (128-bit), or the
    tiny, NOT secure test ring (the one place the flag becomes parameters); refresh mode
    "hospital" has its own depth and ring (`he.params.params_for_mode`)."""
    return params_for_mode(refresh, insecure_test_params)


class Hospital:
    """The key holder's side of one training job.

    `insecure_test_params` is the security level, the same name from the command line on;
    `params` are the job's CKKS parameters (after `prepare`: with the plan's bootstrap slots).
    """

    def __init__(self, workdir: str | os.PathLike[str], *, insecure_test_params: bool = False,
                 refresh: str = BOOTSTRAP, log: Callable[[str], None] | None = None):
        self.folder = HospitalFolder(Path(workdir))
        self.insecure_test_params = insecure_test_params
        self.params = ckks_params(insecure_test_params, refresh)
        self.log = log
        self.data: PreparedData | None = None
        self.recipe: Recipe | None = None
        self.plan: TrainingPlan | None = None
        self.meta: dict = {}
        self._keys: HospitalKeys | None = None
        self._scaler: FeatureScaler | None = None

    # ---- 1. prepare ----------------------------------------------------------------------
    def prepare(self, features: FeatureSet, given: Overrides | None = None) -> Recipe:
        """Probe, derived settings, public plan and range check; writes plan.json and the
        local prepared data and scaler. Raises RangeError/RecipeError on refused settings."""
        level = ckks_params(self.insecure_test_params, self.params.refresh)
        data, recipe = derive_recipe(features, level, given, log=self.log)
        plan = recipe.plan  # the plan whose mirror passed derive_recipe's range check
        self.data, self.recipe, self.plan = data, recipe, plan
        self.params = level.with_bootstrap_slots(plan.bootstrap_slots)
        self._scaler = data.feature_scaler
        self.folder.local.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder.judge_state.unlink(missing_ok=True)  # a new plan is a new job
        shutil.rmtree(self.folder.refresh_state, ignore_errors=True)
        arrays = {f"{s}_x": x for s, x in data.x.items()}
        arrays.update({f"{s}_y": y for s, y in data.y.items()})
        np.savez(self.folder.prepared, **arrays)
        data.feature_scaler.save(self.folder.scaler)
        self.meta = {"plan": plan.to_dict(), "params": self.params.to_dict(),
                     "n_val": int(len(data.y["val"])), "n_classes": data.n_classes,
                     "dataset": data.name, "insecure": not self.params.is_secure,
                     "pca_dims": recipe.pca_dims, "recipe": recipe.to_dict(),
                     "scaler": data.scaler, "backbone": data.backbone}
        self.folder.plan.write_text(json.dumps(self.meta, indent=2, default=float))
        return recipe

    @classmethod
    def open(cls, workdir: str | os.PathLike[str],
             log: Callable[[str], None] | None = None) -> Hospital:
        """A folder prepared earlier (plan.json and local/prepared.npz)."""
        folder = HospitalFolder(Path(workdir))
        if not folder.plan.exists():
            raise HospitalError(f"{folder.plan} not found: run `medblindtuner hospital keygen` "
                                "first")
        meta = json.loads(folder.plan.read_text())
        hospital = cls(workdir, insecure_test_params=bool(meta.get("insecure")), log=log)
        hospital.meta, hospital.params = meta, CkksParams.from_dict(meta["params"])
        hospital.plan = TrainingPlan.from_dict(meta["plan"])
        if folder.prepared.exists():
            with np.load(folder.prepared, allow_pickle=False) as z:
                splits = sorted({k.rsplit("_", 1)[0] for k in z.files})
                hospital.data = PreparedData(
                    name=meta["dataset"], n_classes=int(meta["n_classes"]),
                    x={s: z[f"{s}_x"] for s in splits}, y={s: z[f"{s}_y"] for s in splits},
                    scaler=meta.get("scaler", {}), backbone=meta.get("backbone", {}))
        return hospital

    def _require_plan(self) -> TrainingPlan:
        if self.plan is None:
            raise HospitalError("no training plan yet: call prepare() first")
        return self.plan

    def _require_data(self) -> PreparedData:
        if self.data is None:
            raise HospitalError(f"{self.folder.prepared} not found: prepare the data first")
        return self.data

    # ---- 2. keys --------------------------------------------------------------------------
    def generate_keys(self) -> HospitalKeys:
        """CKKS keys for the plan: public bundle for the cloud, secret key kept in local/."""
        plan = self._require_plan()
        keys = HospitalKeys.generate(self.params, plan.rotation_indices,
                                     allow_insecure=self.insecure_test_params,
                                     shard_rotation_indices=plan.kernel_rotation_indices)
        keys.save_public_bundle(self.folder.public_bundle)
        self.folder.local.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys.save_secret_key(self.folder.secret_key)
        self._keys = keys
        return keys

    @property
    def keys(self) -> HospitalKeys:
        """The keys in memory, or the secret key reloaded without the GB of evaluation keys
        (all the hospital needs to encrypt and decrypt)."""
        if self._keys is None:
            if not self.folder.secret_key.exists():
                raise HospitalError(f"{self.folder.secret_key} not found: generate keys first")
            self._keys = HospitalKeys.load(self.folder.public_bundle, self.folder.secret_key,
                                           allow_insecure=self.insecure_test_params,
                                           with_eval_keys=False)
        return self._keys

    def release_evaluation_keys(self) -> None:
        """Forget the evaluation keys (GBs) once the bundle is written; `keys` reloads the
        secret key alone."""
        import gc

        import openfhe as ofhe

        self._keys = None
        ofhe.ClearEvalMultKeys()
        ofhe.CryptoContext.ClearEvalAutomorphismKeys()
        ofhe.ReleaseAllContexts()
        gc.collect()

    # ---- 3. data --------------------------------------------------------------------------
    def encrypt_dataset(self, progress: Callable[[int], None] | None = None) -> Path:
        """Encrypt the fixed training batches and validation chunks once."""
        plan, data = self._require_plan(), self._require_data()
        write_encrypted_dataset(self.folder.encrypted_dataset, self.keys, plan,
                                data.x["train"], data.y["train"], data.x["val"],
                                data.y["val"], progress=progress)
        return self.folder.encrypted_dataset

    # ---- 4. training decisions and the result ---------------------------------------------
    def judge(self) -> HospitalJudge:
        """Decrypts one validation loss per epoch and answers continue/stop + best epoch."""
        return HospitalJudge(self.keys, self._require_plan(), int(self.meta["n_val"]),
                             state_path=self.folder.judge_state)

    def refresher(self, judge: HospitalJudge | None = None) -> HospitalRefresher:
        """Answers the cloud's refresh requests in refresh mode "hospital": the planned ones
        only, in order, none after `judge` stopped training; persisted in local/refreshes/."""
        stopped = (lambda: judge.stopped) if judge is not None else (lambda: False)
        return HospitalRefresher(self.keys, self._require_plan(), self.folder.refresh_state,
                                 stopped=stopped)

    def decrypt_result(self, directory: Path | None = None) -> np.ndarray:
        """(rows, features) weights from the downloaded encrypted result; refused when the
        cloud claims a best epoch other than the one this hospital's judge chose."""
        plan = self._require_plan()
        result = EncryptedResult.load(directory or self.folder.result, self.params, plan.rows)
        if self.folder.judge_state.exists():
            chosen = self.judge().best_epoch
            if chosen and result.best_epoch != chosen:
                raise JudgeRefusal(f"the cloud returned the weights of epoch "
                                   f"{result.best_epoch}, but the hospital chose epoch "
                                   f"{chosen}: refused")
        return decrypt_weights(self.keys, plan, result.weights)

    # ---- 5. inference ---------------------------------------------------------------------
    @property
    def scaler(self) -> FeatureScaler:
        if self._scaler is None:
            if not self.folder.scaler.exists():
                raise HospitalError(f"{self.folder.scaler} not found: prepare the data first")
            self._scaler = FeatureScaler.load(self.folder.scaler)
        return self._scaler

    def scale(self, raw_features: np.ndarray) -> np.ndarray:
        """New backbone features -> the model's input rows (the training transform)."""
        plan = self._require_plan()
        raw = np.asarray(raw_features, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.scaler.n_features_in_:
            raise ValueError(f"expected rows of {self.scaler.n_features_in_} features, got "
                             f"shape {raw.shape}")
        x = self.scaler.augment(raw)
        if x.shape[1] != plan.n_features:
            raise ValueError(f"rows have {x.shape[1]} columns with bias; the model expects "
                             f"{plan.n_features}")
        return x

    def encrypt_queries(self, x: np.ndarray, directory: Path) -> Path:
        """Encrypt scaled rows for the cloud to score; returns the artifact folder."""
        encrypt_queries(self.keys, self._require_plan(), x).save(directory, self.params)
        return Path(directory)

    def decrypt_scores(self, directory: Path) -> np.ndarray:
        """(n, c) class probabilities from the cloud's encrypted scores."""
        scores, sizes = load_scores(directory, self.params)
        return decrypt_scores(self.keys, self._require_plan(), scores, sizes)

    def probabilities(self, weights: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Plaintext scoring with decrypted weights (the hospital owns the model)."""
        return class_probabilities(weights, x, self._require_plan().n_classes)
