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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import openfhe as ofhe

from medblindtuner.failpoints import failpoint
from medblindtuner.formats import (
    DATASET_FORMAT,
    DECAY_FILE_NAME,
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
                   cts: dict[str, ofhe.Ciphertext] | Iterable[tuple[str, ofhe.Ciphertext]],
                   **fields) -> dict:
    """Save `cts` (file name -> ciphertext, or such pairs as they are made: each is written
    and can be freed before the next) and the manifest that lists and checksums them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = cts.items() if isinstance(cts, dict) else cts
    files = {name: save_ciphertext(directory / name, ct) for name, ct in pairs}
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


# a dataset's training chunks stay in memory up to this size; beyond it each step reads its
# chunks from disk, so memory does not grow with the number of samples
RESIDENT_TRAIN_BYTES = 2 << 30


class StoredChunks(Sequence[EncryptedChunk]):
    """A split's chunks as they lie in a dataset folder, read (and checksummed) when used.

    `kept` holds them all once read (`open(..., resident=True)`); without it each access
    reads the chunk again, so only the chunks of the current step are in memory."""

    def __init__(self, directory: Path, manifest: dict, plan: TrainingPlan, split: str,
                 sizes: Sequence[int],
                 adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext] | None = None,
                 kept: list[EncryptedChunk] | None = None) -> None:
        self.directory, self.manifest, self.plan = Path(directory), manifest, plan
        self.split, self.sizes, self.adopt, self.kept = split, list(sizes), adopt, kept

    @classmethod
    def open(cls, directory: Path, manifest: dict, plan: TrainingPlan, split: str,
             sizes: Sequence[int], resident: bool,
             adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext] | None = None) -> StoredChunks:
        chunks = cls(directory, manifest, plan, split, sizes, adopt)
        if resident:
            chunks.kept = [chunks.read(i) for i in range(len(chunks))]
        return chunks

    @property
    def resident(self) -> bool:
        return self.kept is not None

    def read(self, index: int) -> EncryptedChunk:
        """Chunk `index` from disk (checksummed), adopted when this copy has an `adopt`."""
        chunk = load_chunk(self.directory, self.manifest, self.plan, self.split, index,
                           self.sizes[index])
        return chunk.adopted(self.adopt) if self.adopt else chunk

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return self.kept[index] if self.kept is not None else self.read(index)

    def __iter__(self) -> Iterator[EncryptedChunk]:
        return (self[i] for i in range(len(self)))

    def adopted(self, adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext]) -> StoredChunks:
        kept = None if self.kept is None else [c.adopted(adopt) for c in self.kept]
        return StoredChunks(self.directory, self.manifest, self.plan, self.split, self.sizes,
                            adopt, kept)

    def file_bytes(self) -> int:
        """Bytes of this split's files on disk (from the manifest)."""
        return sum(entry["bytes"] for name, entry in self.manifest["files"].items()
                   if name.startswith(f"{self.split}_"))


def _chunk_files(split: str, chunks: Iterable[EncryptedChunk]
                 ) -> Iterator[tuple[str, ofhe.Ciphertext]]:
    for index, chunk in enumerate(chunks):
        for kind, ct in chunk.files().items():
            yield dataset_file_name(split, index, kind), ct


@dataclass
class EncryptedDataset:
    plan: TrainingPlan
    train: Sequence[EncryptedChunk]  # file order; `batch` groups them into steps
    val: Sequence[EncryptedChunk]
    # what every ciphertext went through at load (`load(..., adopt=)`), if anything
    adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext] | None = None
    # a preconditioned plan's per-feature decay of the look-ahead weights (1 - lr wd p_j)
    decay: ofhe.Ciphertext | None = None

    def batch(self, index: int) -> list[EncryptedChunk]:
        """The chunks of training batch `index` (one step)."""
        return [self.train[t] for t in self.plan.batch_chunks(index)]

    def adopted(self, adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext]) -> EncryptedDataset:
        """The same dataset with every ciphertext passed through `adopt` (Evaluator.adopt);
        itself when it was loaded with that `adopt` (no second copy)."""
        if self.adopt is not None and self.adopt == adopt:
            return self

        def each(chunks: Sequence[EncryptedChunk]) -> Sequence[EncryptedChunk]:
            if isinstance(chunks, StoredChunks):
                return chunks.adopted(adopt)
            return [c.adopted(adopt) for c in chunks]

        decay = None if self.decay is None else adopt(self.decay)
        return EncryptedDataset(self.plan, each(self.train), each(self.val), adopt, decay)

    def save(self, directory: Path, params: CkksParams) -> dict:
        return self.write(directory, params, self.plan, self.train, self.val, self.decay)

    @staticmethod
    def write(directory: Path, params: CkksParams, plan: TrainingPlan,
              train: Iterable[EncryptedChunk], val: Iterable[EncryptedChunk],
              decay: ofhe.Ciphertext | None = None) -> dict:
        """Write chunks as they come (an iterator keeps only one chunk in memory)."""
        if (decay is not None) != plan.config.preconditioned:
            raise ValueError("a preconditioned plan's dataset carries its feature decay, "
                             "and only such a plan's")

        def files() -> Iterator[tuple[str, ofhe.Ciphertext]]:
            if decay is not None:
                yield DECAY_FILE_NAME, decay
            yield from _chunk_files("train", train)
            yield from _chunk_files("val", val)

        return write_artifact(directory, DATASET_FORMAT, params, files(), plan=plan.to_dict())

    @classmethod
    def load(cls, directory: Path, params: CkksParams, resident: bool | None = None,
             adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext] | None = None
             ) -> EncryptedDataset:
        """The dataset in `directory`. `resident=None`: training chunks stay in memory when
        their files total at most `RESIDENT_TRAIN_BYTES`, else are read at each step.
        `adopt` (the trainer's `Evaluator.adopt`) is applied to each ciphertext as it is read,
        so a resident dataset is never held twice (read, then adopted)."""
        directory = Path(directory)
        manifest = read_dataset_manifest(directory, params)
        plan = TrainingPlan.from_dict(manifest["plan"])
        sizes = plan.train_chunk_sizes
        if resident is None:
            resident = StoredChunks(directory, manifest, plan, "train",
                                    sizes).file_bytes() <= RESIDENT_TRAIN_BYTES
        train = StoredChunks.open(directory, manifest, plan, "train", sizes, resident, adopt)
        val = [load_chunk(directory, manifest, plan, "val", i, n)
               for i, n in enumerate(plan.val_batch_sizes)]
        decay = (load_listed(directory, manifest, DECAY_FILE_NAME)
                 if plan.config.preconditioned else None)
        if adopt:
            val = [c.adopted(adopt) for c in val]
            decay = None if decay is None else adopt(decay)
        return cls(plan, train, val, adopt, decay)


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
        failpoint("result.staged")
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
