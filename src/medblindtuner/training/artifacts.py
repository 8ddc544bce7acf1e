"""Ciphertext artifacts that travel between hospital and cloud, one format each.

Every artifact is a folder of ciphertext files plus `manifest.json` with a format tag, the
CKKS parameter fingerprint and a checksum per file (`he.ciphertexts`); readers refuse a
folder whose format, fingerprint or checksums do not match.

- encrypted dataset (hospital -> cloud): fixed training batches and validation chunks
- encrypted queries (hospital -> cloud): rows to score
- encrypted scores (cloud -> hospital): logits per query ciphertext and weight row
- encrypted result (cloud -> hospital): the best epoch's weight rows
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openfhe as ofhe

from medblindtuner.formats import (
    DATASET_FORMAT,
    MANIFEST_NAME,
    QUERIES_FORMAT,
    RESULT_FORMAT,
    SCORES_FORMAT,
    dataset_file_name,
    query_file_name,
    result_weight_name,
    score_file_name,
)
from medblindtuner.he.ciphertexts import (
    atomic_write_json,
    load_ciphertext,
    read_artifact_manifest,
    replace_dir,
    save_ciphertext,
)
from medblindtuner.he.keys import BundleError
from medblindtuner.he.params import CkksParams
from medblindtuner.training.plan import TrainingPlan


def write_artifact(directory: Path, fmt: str, params: CkksParams,
                   cts: dict[str, ofhe.Ciphertext], **fields) -> dict:
    """Save `cts` (file name -> ciphertext) and the manifest that lists and checksums them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: save_ciphertext(directory / name, ct) for name, ct in cts.items()}
    manifest = {"format": fmt, "params_fingerprint": params.fingerprint(), **fields,
                "files": files}
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def read_artifact(directory: Path, fmt: str, params: CkksParams) -> dict:
    """The manifest of an artifact folder, after the format and fingerprint checks."""
    return read_artifact_manifest(Path(directory), fmt, params.fingerprint())


def load_listed(directory: Path, manifest: dict, name: str) -> ofhe.Ciphertext:
    """One ciphertext the manifest lists, checked against its checksum."""
    if name not in manifest["files"]:
        raise BundleError(f"{directory} lacks {name}")
    return load_ciphertext(Path(directory) / name, manifest["files"][name])


def read_dataset_manifest(directory: Path, params: CkksParams) -> dict:
    return read_artifact(directory, DATASET_FORMAT, params)


@dataclass
class EncryptedChunk:
    """The samples of one data ciphertext: features twice (logits), once (gradient), labels.

    A training batch (one step) is one or more chunks (`TrainingPlan.batch_chunks`)."""

    n_samples: int
    x_dup: ofhe.Ciphertext
    x_grad: ofhe.Ciphertext
    labels: list[ofhe.Ciphertext]

    def adopted(self, adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext]) -> EncryptedChunk:
        return EncryptedChunk(self.n_samples, adopt(self.x_dup), adopt(self.x_grad),
                              [adopt(y) for y in self.labels])

    def files(self) -> dict[str, ofhe.Ciphertext]:
        """Kind (x_dup, x_grad, y<j>) -> ciphertext."""
        return {"x_dup": self.x_dup, "x_grad": self.x_grad,
                **{f"y{j}": ct for j, ct in enumerate(self.labels)}}


def load_chunk(directory: Path, manifest: dict, plan: TrainingPlan, split: str,
               index: int, n_samples: int) -> EncryptedChunk:
    """Chunk `index` of `split`, each file checked against the manifest's checksum."""
    def ct(kind: str) -> ofhe.Ciphertext:
        return load_listed(directory, manifest, dataset_file_name(split, index, kind))

    return EncryptedChunk(n_samples, ct("x_dup"), ct("x_grad"),
                          [ct(f"y{j}") for j in range(plan.label_cts)])


@dataclass
class EncryptedDataset:
    plan: TrainingPlan
    train: list[EncryptedChunk]  # file order; `batch` groups them into steps
    val: list[EncryptedChunk]

    def batch(self, index: int) -> list[EncryptedChunk]:
        """The chunks of training batch `index` (one step)."""
        return [self.train[t] for t in self.plan.batch_chunks(index)]

    def adopted(self, adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext]) -> EncryptedDataset:
        """The same dataset with every ciphertext passed through `adopt` (Evaluator.adopt)."""
        return EncryptedDataset(self.plan, [c.adopted(adopt) for c in self.train],
                                [c.adopted(adopt) for c in self.val])

    def save(self, directory: Path, params: CkksParams) -> dict:
        cts: dict[str, ofhe.Ciphertext] = {}
        for split, chunks in (("train", self.train), ("val", self.val)):
            for index, chunk in enumerate(chunks):
                cts.update({dataset_file_name(split, index, kind): ct
                            for kind, ct in chunk.files().items()})
        return write_artifact(directory, DATASET_FORMAT, params, cts, plan=self.plan.to_dict())

    @classmethod
    def load(cls, directory: Path, params: CkksParams) -> EncryptedDataset:
        directory = Path(directory)
        manifest = read_dataset_manifest(directory, params)
        plan = TrainingPlan.from_dict(manifest["plan"])

        def chunks(split: str, sizes: list[int]) -> list[EncryptedChunk]:
            return [load_chunk(directory, manifest, plan, split, i, n)
                    for i, n in enumerate(sizes)]

        return cls(plan, chunks("train", plan.train_chunk_sizes),
                   chunks("val", list(plan.val_batch_sizes)))


@dataclass
class EncryptedQueries:
    """Query rows packed `samples_per_ct` to a ciphertext; `sizes` says how many are real."""

    sizes: tuple[int, ...]
    cts: list[ofhe.Ciphertext]

    def save(self, directory: Path, params: CkksParams) -> dict:
        return write_artifact(directory, QUERIES_FORMAT, params,
                              {query_file_name(i): ct for i, ct in enumerate(self.cts)},
                              sizes=list(self.sizes))

    @classmethod
    def load(cls, directory: Path, params: CkksParams) -> EncryptedQueries:
        manifest = read_artifact(directory, QUERIES_FORMAT, params)
        cts = [load_listed(directory, manifest, query_file_name(i))
               for i in range(len(manifest["sizes"]))]
        return cls(tuple(manifest["sizes"]), cts)


def save_scores(directory: Path, scores: list[list[ofhe.Ciphertext]], sizes,
                params: CkksParams) -> dict:
    """Cloud: encrypted logits, [query ciphertext][weight row]."""
    cts = {score_file_name(i, j): ct for i, row in enumerate(scores)
           for j, ct in enumerate(row)}
    return write_artifact(directory, SCORES_FORMAT, params, cts, sizes=list(sizes),
                          rows=len(scores[0]) if scores else 0)


def load_scores(directory: Path, params: CkksParams) -> tuple[list[list[ofhe.Ciphertext]], list]:
    manifest = read_artifact(directory, SCORES_FORMAT, params)
    scores = [[load_listed(directory, manifest, score_file_name(i, j))
               for j in range(manifest["rows"])] for i in range(len(manifest["sizes"]))]
    return scores, manifest["sizes"]


@dataclass
class EncryptedResult:
    """The trained model as the cloud returns it: the best epoch's encrypted weight rows."""

    weights: list[ofhe.Ciphertext]
    best_epoch: int
    epochs: int
    steps: int
    details: dict  # ops counters, peak RSS, job id: reported, not trusted for anything

    def save(self, directory: Path, params: CkksParams) -> dict:
        """Written next to `directory` and moved into place: a reader never sees half."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}_tmp")
        manifest = write_artifact(tmp, RESULT_FORMAT, params,
                                  {result_weight_name(j): ct for j, ct in enumerate(self.weights)},
                                  best_epoch=self.best_epoch, epochs=self.epochs,
                                  steps=self.steps, rows=len(self.weights), **self.details)
        replace_dir(tmp, directory)
        return manifest

    @classmethod
    def load(cls, directory: Path, params: CkksParams, rows: int) -> EncryptedResult:
        """Refuses a result with another format, fingerprint or number of weight rows."""
        manifest = read_artifact(directory, RESULT_FORMAT, params)
        if manifest.get("rows") != rows:
            raise BundleError(f"{directory}: {manifest.get('rows')} weight rows, the plan has "
                              f"{rows}")
        details = {k: v for k, v in manifest.items() if k not in (
            "format", "params_fingerprint", "files", "rows", "best_epoch", "epochs", "steps")}
        return cls([load_listed(directory, manifest, result_weight_name(j)) for j in range(rows)],
                   int(manifest["best_epoch"]), int(manifest["epochs"]),
                   int(manifest["steps"]), details)
