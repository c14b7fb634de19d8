"""Named public domains: where each archive lives upstream, its sha256, format and licence."""

from __future__ import annotations

from dataclasses import dataclass

from fedmerge.errors import FedmergeError

UPSTREAM_BASE = "https://raw.githubusercontent.com/"

_MERGEREC_LICENCE = "MergeRec repository: MIT; Amazon review data: research use (McAuley et al.)"
_SEQREC_LICENCE = (
    "SeqRecBenchmark-Datasets repository: MIT; Amazon review data: research use (McAuley et al.)"
)


@dataclass(frozen=True)
class DatasetSpec:
    """One registered domain.

    Attributes
    ----------
    name : str
        Domain name used on the command line.
    path : str
        ``OWNER/REPO/PATH`` of the archive on the upstream repository's ``main`` branch;
        also its path below a mirror.
    sha256 : str
        Pinned digest; an archive that does not match is rejected.
    format : str
        Importer name (a key of ``fedmerge.data.importers.IMPORTERS``).
    description : str
        What the data is.
    licence : str
        Licence and terms of use.
    expected : tuple[int, int, int]
        Users, items, interactions of the whole data set (all splits), as published.
    """

    name: str
    path: str
    sha256: str
    format: str
    description: str
    licence: str
    expected: tuple[int, int, int]

    @property
    def url(self) -> str:
        """The upstream URL (GitHub raw) of the archive."""
        owner, repo, rest = self.path.split("/", 2)
        return f"{UPSTREAM_BASE}{owner}/{repo}/main/{rest}"


def _mergerec(
    name: str, file: str, sha256: str, description: str, expected: tuple[int, int, int]
) -> DatasetSpec:
    return DatasetSpec(
        name,
        f"DIALLab-SKKU/MergeRec/datasets/{file}",
        sha256,
        "mergerec",
        description,
        _MERGEREC_LICENCE,
        expected,
    )


def _seqrec(
    name: str,
    folder: str,
    sha256: str,
    description: str,
    expected: tuple[int, int, int],
    licence: str = _SEQREC_LICENCE,
) -> DatasetSpec:
    return DatasetSpec(
        name,
        f"Tiny-Snow/SeqRecBenchmark-Datasets/data/{folder}/proc.zip",
        sha256,
        "seqrec-zip",
        description,
        licence,
        expected,
    )


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _mergerec(
            "beauty",
            "Beauty.tar.gz",
            "178739b3d2d154a7355a112cc1998f714ac443cf96a9bed5bb09a487a00eeceb",
            "Amazon 2014 Beauty, 5-core (MergeRec split)",
            (22363, 12101, 198502),
        ),
        _mergerec(
            "sports",
            "Sports.tar.gz",
            "3f6929b1bfb85f618bdf14e53a7afdb55a151837baf4b39b6babf1ef96448e54",
            "Amazon 2014 Sports and Outdoors, 5-core (MergeRec split)",
            (35598, 18357, 296337),
        ),
        _mergerec(
            "toys",
            "Toys.tar.gz",
            "2dfc146e57c40a760110eb6bc0a3b51d2481d98f8c6b66be8535959269a50ba4",
            "Amazon 2014 Toys and Games, 5-core (MergeRec split)",
            (19412, 11924, 167597),
        ),
        _mergerec(
            "pantry",
            "Pantry.tar.gz",
            "446860493bda86a9c978280a210123fd17c298a746e97e4af11a65c96470252a",
            "Amazon 2018 Prime Pantry (MergeRec split; repeats allowed)",
            (14180, 4968, 137769),
        ),
        _seqrec(
            "books",
            "amazon2014-book_1000000",
            "4bb6bbcd860d0d494e6d6f13b5fcf374af4c63417023adf340cb455b7d06fd81",
            "Amazon 2014 Books, 1M-interaction sample",
            (38234, 38519, 517167),
        ),
        _seqrec(
            "movies",
            "movielens-1m",
            "6524119f8e749306416c73de03bc2489a52447fdbfffda3ae08362cb58e6584d",
            "MovieLens-1M",
            (6040, 3416, 999611),
            licence="SeqRecBenchmark-Datasets repository: MIT; MovieLens: GroupLens terms "
            "(research use, no redistribution)",
        ),
        _seqrec(
            "games",
            "amazon2018-game",
            "61e683906378924ffb9bfba719afab4c5adf29c287942deba521f69ee6f17bf4",
            "Amazon 2018 Video Games",
            (50597, 16874, 453637),
        ),
        _seqrec(
            "steam",
            "steam_100000",
            "1a286b7c035b773b07b3bcd29c45c6173b13a0ba1a029c61a7f46b21195518e3",
            "Steam, 100k-user sample",
            (10369, 3593, 126824),
            licence="SeqRecBenchmark-Datasets repository: MIT; Steam data: research use (Kang & "
            "McAuley)",
        ),
        _seqrec(
            "electronics",
            "amazon2014-electronic_1000000",
            "cf51ad838b6c9ef0db92ca2956233ea85c59818361bd4886c2e5d2e730c4d3e0",
            "Amazon 2014 Electronics, 1M-interaction sample",
            (28566, 15743, 241198),
        ),
    )
}

PINNED_SHA256: frozenset[str] = frozenset(spec.sha256 for spec in REGISTRY.values())


def get_spec(name: str) -> DatasetSpec:
    """The registered domain `name`; an unknown name is an error that lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise FedmergeError(
            f"unknown domain {name!r}; known domains: {', '.join(REGISTRY)}, synth-N (N = 0, 1, "
            "...), or a name given to `fedmerge data import`"
        ) from None
