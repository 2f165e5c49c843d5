"""Datasets for the demo and the benchmarks: named datasets from local files, and partitioners.

Devices never need this: each holds its own data (``shared.runtime.data``). The operator's
tools load a whole dataset and split it among simulated clients (IID, Dirichlet, shards).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shared.runtime.data import ArrayDataset, DataFormatError, idx_pairs, load_idx_pair

# ---------------------------------------------------------------- named datasets

# name -> (torchvision class / raw subdirectory, Debian package data directory)
_NAMED: dict[str, tuple[str, str]] = {
    "fashion-mnist": ("FashionMNIST", "/usr/share/datasets/fashion-mnist"),
    "mnist": ("MNIST", "/usr/share/datasets/mnist"),
}
_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}


def _candidate_dirs(root: Path, tv_name: str) -> list[Path]:
    """Places under ``root`` where IDX files of a named dataset may live."""
    return [root, root / tv_name / "raw", root / tv_name, root / tv_name.lower()]


def load_named_dataset(
    name: str, train: bool, root: str | Path | None = None, download: bool = False
) -> ArrayDataset:
    """Load the train or test split of ``fashion-mnist`` or ``mnist`` from local files.

    Searches ``root`` (IDX files directly or a torchvision root), then the Debian
    package directory, then ``$FEDMQ_DATA_ROOT``. Never touches the network unless
    ``download=True`` (which needs ``root``).
    """
    canonical = _ALIASES.get(name.lower(), name.lower())
    if canonical not in _NAMED:
        raise ValueError(f"unknown dataset {name!r}; valid names: fashion-mnist, fmnist, mnist")
    tv_name, system_dir = _NAMED[canonical]
    prefix = "train" if train else "t10k"
    roots = [Path(root)] if root is not None else []
    roots.append(Path(system_dir))
    if os.environ.get("FEDMQ_DATA_ROOT"):
        roots.append(Path(os.environ["FEDMQ_DATA_ROOT"]))
    for base in roots:
        for directory in _candidate_dirs(base, tv_name):
            if directory.is_dir() and prefix in (pairs := idx_pairs(directory)):
                return load_idx_pair(*pairs[prefix])
    if download:
        if root is None:
            raise ValueError("download=True needs an explicit root directory to download into")
        import torchvision.datasets as tvd

        getattr(tvd, tv_name)(str(root), train=train, download=True)
        return load_named_dataset(canonical, train, root, download=False)
    package = "dataset-fashion-mnist" if canonical == "fashion-mnist" else "dataset-mnist"
    raise DataFormatError(
        f"{canonical} ({prefix}) IDX files not found in {[str(r) for r in roots]}; "
        f"run 'apt-get install {package}', pass a root directory holding the IDX files, "
        "or set FEDMQ_DATA_ROOT"
    )


# ------------------------------------------------------------------ partitioners


def _check_labels(labels: np.ndarray, num_clients: int) -> np.ndarray:
    """Validate partitioner inputs shared by every scheme."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if len(labels) < num_clients:
        raise ValueError(f"cannot split {len(labels)} samples across {num_clients} clients")
    return labels


def partition_iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Uniformly random split into ``num_clients`` near-equal disjoint parts."""
    labels = _check_labels(labels, num_clients)
    parts = np.array_split(rng.permutation(len(labels)), num_clients)
    return [np.sort(p).astype(np.int64) for p in parts]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_retries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided across clients by ``Dir(alpha)``.

    Proportions are resampled until every client holds at least ``min_size``
    samples; smaller ``alpha`` means more skew.
    """
    labels = _check_labels(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0 or len(labels) < num_clients * min_size:
        raise ValueError(
            f"cannot give each of {num_clients} clients {min_size} samples from {len(labels)}"
        )
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(max_retries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return merged
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {num_clients} clients "
        f">= {min_size} samples in {max_retries} tries; raise alpha or lower min_size"
    )


def partition_shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al.: label-sorted shards dealt to clients."""
    labels = _check_labels(labels, num_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if len(labels) < num_shards:
        raise ValueError(f"cannot cut {len(labels)} samples into {num_shards} shards")
    # Shuffle before the stable sort so that which samples of a class share a
    # shard is random too, not just which shards a client gets.
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [
        np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in assignment
    ]


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    rng: np.random.Generator,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Split sample indices across clients with ``scheme`` in {iid, dirichlet, shards}."""
    if scheme == "iid":
        return partition_iid(labels, num_clients, rng)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, rng)
    if scheme == "shards":
        return partition_shards(labels, num_clients, shards_per_client, rng)
    raise ValueError(f"unknown partition scheme {scheme!r}; valid: iid, dirichlet, shards")
