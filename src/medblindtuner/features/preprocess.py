"""Feature scaling for encrypted training: standardise, optional PCA, bounded L2 norm.

CKKS arithmetic (and the polynomial approximations of sigmoid/softmax the untrusted trainer
evaluates) is only accurate on a known, bounded input range, and fewer dimensions mean fewer
ciphertext slots/rotations. Everything is fitted on the training split only, so no statistics
of validation/test data leak into the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA

# Relative safety margin so float32 rounding cannot push a norm just above max_norm.
_MARGIN = 1e-5


class FeatureScaler:
    """Train-only fitted transform: [standardise] -> [PCA to k dims] -> scale/clip to a norm ball.

    Guarantee: after `transform`, every feature vector has L2 norm <= max_norm (default 1.0).
    `augment` appends the bias column. Its value `bias_` is the square root of the largest
    eigenvalue of the scaled training second-moment matrix (<= max_norm), so the intercept has
    the same curvature as the steepest feature direction: with a constant 1 the intercept
    dominated the curvature and fixed a step size far too small for the features
    (docs/results.md). The model is the same; only the gradient steps are better conditioned.
    On the training split this holds because the global scale factor is max_norm divided by the
    largest training-row norm; for unseen data (val/test/new patients) a row that would exceed
    max_norm after scaling is clipped, i.e. shrunk onto the sphere of radius max_norm (its
    direction is kept). Rows within the bound are left untouched.
    """

    def __init__(
        self, standardize: bool = True, n_components: int | None = None, max_norm: float = 1.0
    ) -> None:
        if max_norm <= 0:
            raise ValueError("max_norm must be positive")
        if n_components is not None and n_components < 1:
            raise ValueError("n_components must be >= 1 or None")
        self.standardize = standardize
        self.n_components = n_components
        self.max_norm = float(max_norm)
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None
        self.pca_mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.explained_variance_ratio_: np.ndarray | None = None
        self.scale_: float | None = None
        self.n_features_in_: int | None = None
        self.n_train_: int | None = None
        self.bias_: float = 1.0

    @property
    def fitted(self) -> bool:
        """Whether fit() (or load()) has run."""
        return self.scale_ is not None

    @property
    def n_features_out(self) -> int:
        """Output width (PCA dims, or the input width)."""
        if self.components_ is not None:
            return int(self.components_.shape[0])
        if self.n_features_in_ is None:
            raise RuntimeError("FeatureScaler is not fitted")
        return self.n_features_in_

    def project(self, x: np.ndarray) -> np.ndarray:
        """Standardised (and PCA-projected) features before the norm scaling, float64."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise ValueError(f"expected (N, {self.n_features_in_}) features, got {x.shape}")
        if self.standardize:
            x = (x - self.mean_) / self.std_
        if self.components_ is not None:
            x = (x - self.pca_mean_) @ self.components_.T
        return x

    def fit(self, x_train: np.ndarray, seed: int = 0) -> FeatureScaler:
        """Fit every statistic on the training features only."""
        x = np.asarray(x_train, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need a 2-D training matrix with >= 2 rows, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("training features contain NaN/inf")
        self.n_features_in_, self.n_train_ = int(x.shape[1]), int(x.shape[0])
        self.mean_ = x.mean(axis=0)
        std = x.std(axis=0)
        self.std_ = np.where(std > 1e-12, std, 1.0)  # constant features: keep, don't divide by 0
        self.components_ = self.pca_mean_ = self.explained_variance_ratio_ = None
        z = (x - self.mean_) / self.std_ if self.standardize else x
        if self.n_components is not None:
            k = min(self.n_components, x.shape[0], x.shape[1])
            pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(z)
            self.components_ = pca.components_.astype(np.float64)
            self.pca_mean_ = pca.mean_.astype(np.float64)
            self.explained_variance_ratio_ = pca.explained_variance_ratio_.astype(np.float64)
            z = (z - self.pca_mean_) @ self.components_.T
        largest = float(np.linalg.norm(z, axis=1).max())
        self.scale_ = self.max_norm * (1 - _MARGIN) / largest if largest > 0 else 1.0
        top_singular = float(np.linalg.norm(z * self.scale_, ord=2))
        self.bias_ = top_singular / np.sqrt(x.shape[0]) if top_singular > 0 else 1.0
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply the fitted transform; rows are clipped to L2 norm <= max_norm. Returns float32."""
        if not self.fitted:
            raise RuntimeError("FeatureScaler is not fitted")
        z = self.project(x) * self.scale_
        bound = self.max_norm * (1 - _MARGIN)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        z = np.where(norms > bound, z * (bound / np.maximum(norms, 1e-300)), z)
        return z.astype(np.float32)

    def augment(self, x: np.ndarray) -> np.ndarray:
        """`transform` plus the constant bias column (value `bias_`), float64."""
        z = self.transform(x).astype(np.float64)
        return np.hstack([z, np.full((len(z), 1), self.bias_)])

    def fit_transform(self, x_train: np.ndarray) -> np.ndarray:
        """fit() then transform() on the same training matrix."""
        return self.fit(x_train).transform(x_train)

    def clipped_fraction(self, x: np.ndarray) -> float:
        """Share of rows that transform() would clip (a drift indicator for unseen data)."""
        z = self.project(x) * self.scale_
        return float(np.mean(np.linalg.norm(z, axis=1) > self.max_norm * (1 - _MARGIN)))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Store parameters as plain arrays in an .npz (no pickle)."""
        if not self.fitted:
            raise RuntimeError("FeatureScaler is not fitted")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "standardize": np.asarray(self.standardize),
            "max_norm": np.asarray(self.max_norm),
            "scale": np.asarray(self.scale_),
            "bias": np.asarray(self.bias_),
            "n_train": np.asarray(self.n_train_),
            "mean": self.mean_,  # type: ignore[dict-item]
            "std": self.std_,  # type: ignore[dict-item]
        }
        if self.components_ is not None:
            arrays["components"] = self.components_
            arrays["pca_mean"] = self.pca_mean_  # type: ignore[assignment]
            arrays["explained_variance_ratio"] = self.explained_variance_ratio_  # type: ignore[assignment]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureScaler:
        """Inverse of save()."""
        with np.load(path, allow_pickle=False) as z:
            comps = z["components"] if "components" in z.files else None
            sc = cls(
                standardize=bool(z["standardize"]),
                n_components=None if comps is None else int(comps.shape[0]),
                max_norm=float(z["max_norm"]),
            )
            sc.mean_, sc.std_ = z["mean"], z["std"]
            sc.scale_, sc.n_train_ = float(z["scale"]), int(z["n_train"])
            sc.bias_ = float(z["bias"]) if "bias" in z.files else 1.0
            sc.n_features_in_ = int(sc.mean_.shape[0])
            if comps is not None:
                sc.components_, sc.pca_mean_ = comps, z["pca_mean"]
                sc.explained_variance_ratio_ = z["explained_variance_ratio"]
        return sc

    def to_dict(self) -> dict[str, object]:
        """Short JSON-friendly summary for logs and reports."""
        evr = self.explained_variance_ratio_
        return {
            "standardize": self.standardize,
            "n_components": self.n_components,
            "n_features_in": self.n_features_in_,
            "n_features_out": self.n_features_out if self.fitted else None,
            "max_norm": self.max_norm,
            "scale": self.scale_,
            "bias": self.bias_,
            "n_train": self.n_train_,
            "pca_explained_variance": None if evr is None else float(np.sum(evr)),
        }
