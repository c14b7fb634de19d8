"""The kept local trainings: rows that share local training train once.

Local training depends neither on the merge nor, for a mechanism that noises at the server
(``central-dp``), on the privacy setting beyond being non-private: :class:`CachedTraining` keeps
each party's training reply and privacy ledger in ``OUT/training-cache/``, keyed by a sha256 of
the party, its start weights, its ledger before training and the federation config without the
keys that cannot change training (:func:`training_key`), and loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path
from fedmerge.merge.vectors import StateDict
from fedmerge.pipeline import InProcess, log_trained, party_name
from fedmerge.privacy import Ledger, PrivacyConfig
from fedmerge.protocol import (
    PRIVATE_METRICS,
    FederationConfig,
    PartySpec,
    TrainReply,
    party_train,
)
from fedmerge.train.checkpoint import read_state, save_weights

Say = Callable[[str], None]
"""Shows one line of progress to a person."""

UNTRAINED_KEYS = ("merge", "evaluate_valid", "local_calibration", "timeout_minutes", "min_parties")
"""Federation keys that cannot change a party's local training (left out of its cache key)."""


class CachedTraining(InProcess):
    """The in-process parties, whose local training is kept and reused across runs.

    A party's training reply (its update, as safetensors, and its metrics) and its privacy ledger
    after training are kept in `cache` under :func:`training_key`; a later training with the same
    key loads them instead of training.
    """

    def __init__(self, config: FederationConfig, cache: Path, say: Say) -> None:
        super().__init__(config)
        self.cache, self.say = Path(cache), say
        self.trained, self.reused = 0, 0

    def train(self, start: StateDict) -> dict[int, TrainReply | Exception]:
        """Every party fine-tunes from `start`, or its kept training with the same key is loaded."""
        return self._each(
            lambda s: self._train(s, start),
            lambda s, reply, seconds: log_trained(self.log, self.round, s, reply.metrics),
        )

    def _train(self, spec: PartySpec, start: StateDict) -> TrainReply:
        key = training_key(self.config, spec.party, start, self.ledgers[spec.party])
        kept = load_training(self.cache, key)
        if kept is not None:
            reply, self.ledgers[spec.party] = kept
            self.reused += 1
            self.log("party_training_reused", party=party_name(spec), key=key)
            self.say(f"{party_name(spec)}: local training reused (cache key {key[:12]})")
            return shown(reply, self.config)
        reply = party_train(
            self.part(spec),
            start,
            trained_as(self.config),
            self.quiet,
            self.ledgers[spec.party],
            spec.party,
        )
        self.trained += 1
        try:
            save_training(self.cache, key, reply, self.ledgers[spec.party])
        except FedmergeError as err:  # a diverged update: the server judges it, nothing is kept
            self.log("party_training_not_kept", party=party_name(spec), error=str(err))
        return shown(reply, self.config)


def trained_as(config: FederationConfig) -> FederationConfig:
    """The config a party trains under: non-private for a mechanism that noises at the server.

    Such a mechanism changes nothing in local training, so the non-private training stands for it
    (and its kept metrics are those of the non-private run, see :func:`shown`).
    """
    if not config.mechanism().central:
        return config
    return config.model_copy(update={"privacy": PrivacyConfig()})


def shown(reply: TrainReply, config: FederationConfig) -> TrainReply:
    """`reply` as the party sends it under `config`: without the metrics its mechanism withholds."""
    if not config.mechanism().switches.reports:
        return reply
    metrics = {k: v for k, v in reply.metrics.items() if k not in PRIVATE_METRICS}
    return TrainReply(reply.domain, reply.update, metrics)


def training_key(config: FederationConfig, party: int, start: StateDict, ledger: Ledger) -> str:
    """The sha256 (hex) of what a party's local training depends on.

    The party id, the start weights (name, dtype, shape and bytes of every tensor, in key order),
    the party's ledger before training, and the federation config as JSON without
    :data:`UNTRAINED_KEYS`; under a mechanism that noises at the server, the privacy table is the
    default one (the key of the non-private training).
    """
    settings = trained_as(config).model_dump(mode="json")
    for key in UNTRAINED_KEYS:
        settings.pop(key, None)
    digest = hashlib.sha256(b"fedmerge local training\0")
    digest.update(f"party {party}\0".encode())
    for name in sorted(start):
        tensor = start[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(ledger.to_json().encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def save_training(folder: Path, key: str, reply: TrainReply, ledger: Ledger) -> None:
    """Keep `reply` and the party's `ledger` after training under `key`, each file atomically.

    The update is written first and the JSON record last: a record is there only with its update.
    """
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(reply.update, folder / f"{key}.safetensors")
    record = {"domain": reply.domain, "metrics": reply.metrics, "ledger": ledger.to_json()}
    with atomic_path(folder / f"{key}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def load_training(folder: Path, key: str) -> tuple[TrainReply, Ledger] | None:
    """The reply and ledger kept under `key`, or None when there are none (or they are unusable)."""
    record_path, update_path = folder / f"{key}.json", folder / f"{key}.safetensors"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        update = read_state(update_path)
        reply = TrainReply(str(record["domain"]), update, dict(record["metrics"]))
        return reply, Ledger.from_json(record["ledger"])
    except (OSError, ValueError, KeyError, TypeError, FedmergeError):
        return None  # trained again, and kept anew
