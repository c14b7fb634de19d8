"""Synthetic domains ``synth-0``, ``synth-1``, ...: small, deterministic, no download.

Each domain has its own vocabulary, split into topics. Items belong to one topic; their text
is drawn from that topic's words. Within a topic the items form a chain: a user who just
took item i mostly takes the next item of i's chain, sometimes an item of a favourite topic,
rarely a popular item. So the next item depends on the recent ones, and a sequential model
can beat popularity. Item and user ids carry the domain number: no two domains share items.
"""

from __future__ import annotations

import re

import numpy as np

from fedmerge.data.domain import DomainData, from_sequences
from fedmerge.errors import FedmergeError

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ru",
    "ta",
    "ne",
    "so",
    "vi",
    "da",
    "pe",
    "zu",
    "fo",
    "ri",
    "ba",
    "gu",
    "le",
)
_NAME = re.compile(r"synth-(\d+)")


def is_synthetic(name: str) -> bool:
    """Whether `name` names a synthetic domain (``synth-N``)."""
    return _NAME.fullmatch(name) is not None


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))


def synthetic_domain(
    name: str,
    n_users: int = 400,
    n_topics: int = 8,
    items_per_topic: int = 25,
    min_len: int = 6,
    max_len: int = 20,
    p_chain: float = 0.6,
    p_topic: float = 0.25,
) -> DomainData:
    """Generate domain `name` (``synth-N``; N seeds the generator).

    Parameters
    ----------
    name : str
        ``synth-N``.
    n_users, n_topics, items_per_topic : int
        Sizes; the catalogue has ``n_topics * items_per_topic`` items.
    min_len, max_len : int
        Range of a user's sequence length (all splits).
    p_chain, p_topic : float
        Probability that the next item continues the last item's chain, or is drawn from one
        of the user's two favourite topics; otherwise it is drawn by global popularity.
    """
    match = _NAME.fullmatch(name)
    if match is None:
        raise FedmergeError(
            f"{name!r} is not a synthetic domain name; use synth-N with N = 0, 1, ..."
        )
    seed = int(match.group(1))
    rng = np.random.default_rng(seed)
    n_items = n_topics * items_per_topic
    topic_words = [[_word(rng) for _ in range(10)] for _ in range(n_topics)]
    topic_names = [f"{words[0]} {words[1]}" for words in topic_words]
    brands = [_word(rng).capitalize() for _ in range(n_topics * 2)]
    topic_of = np.repeat(np.arange(n_topics), items_per_topic)
    titles = [
        " ".join(rng.choice(topic_words[t], size=3, replace=False)) + f" no {i}"
        for i, t in enumerate(topic_of)
    ]
    text = {
        "title": titles,
        "brand": [brands[2 * t + int(rng.integers(2))] for t in topic_of],
        "category": [topic_names[t] for t in topic_of],
    }
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    sequences = []
    for _ in range(n_users):
        favourites = rng.choice(n_topics, size=2, replace=False)
        item = int(favourites[0]) * items_per_topic + int(rng.integers(items_per_topic))
        seq = [item]
        for _ in range(int(rng.integers(min_len, max_len + 1)) - 1):
            draw = rng.random()
            if draw < p_chain:
                topic, pos = divmod(item, items_per_topic)
                item = topic * items_per_topic + (pos + 1) % items_per_topic
            elif draw < p_chain + p_topic:
                item = int(rng.choice(favourites)) * items_per_topic + int(
                    rng.integers(items_per_topic)
                )
            else:
                item = int(rng.choice(n_items, p=popularity))
            seq.append(item)
        sequences.append(seq)
    return from_sequences(
        name,
        [f"s{seed}-i{i}" for i in range(n_items)],
        text,
        [f"s{seed}-u{u}" for u in range(n_users)],
        sequences,
        source={"format": "synthetic"},
    )
