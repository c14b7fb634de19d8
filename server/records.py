"""Flower records <-> fedmerge's typed messages, both ways.

The only place that knows the wire layout.

The ClientApp (``clients/app.py``) and the ServerApp (``server/app.py``) convert here and pass
the protocol's dataclasses (:mod:`fedmerge.protocol`) everywhere else. Every message carries
the federation config as JSON in its ``config`` record (the strategy forwards the ConfigRecord
Flower hands it, so a wrapper's keys travel too).

========  ====================================================  ====================================
message   request                                               reply
========  ====================================================  ====================================
query     ``config``                                            ``party`` (id, domain, n_items),
                                                                ``table``
train     ``config``, ``arrays`` (the start: one ArrayRecord)   ``update`` (one ArrayRecord),
                                                                ``metrics``, ``party``
evaluate  ``config`` (+ models, splits, sample), ``model-<i>``  ``party``, ``metrics-<i>-<split>``
train.leg ``config``, ``leg`` (hybrid, domain, visit, index,    ``party``, ``weights``, ``moments``,
          step), ``weights``, ``moments`` (a woven adapter's    ``leg``
          carry)
========  ====================================================  ====================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import cast

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)

from fedmerge.errors import FedmergeError
from fedmerge.merge.vectors import StateDict
from fedmerge.protocol import Description, EvaluateRequest, Evaluation, FederationConfig, TrainReply
from fedmerge.train.legs import Carry
from fedmerge.weaving import Leg


def _arrays(content: RecordDict, key: str) -> StateDict:
    """The tensors of the ArrayRecord at `key` (where the wire layout puts one)."""
    return cast(ArrayRecord, content[key]).to_torch_state_dict()


def _config(content: RecordDict, key: str) -> ConfigRecord:
    """The ConfigRecord at `key` (where the wire layout puts one)."""
    return cast(ConfigRecord, content[key])


def _int(record: ConfigRecord, key: str) -> int:
    """The integer at `key` of `record` (where the wire layout puts one)."""
    return int(cast(int, record[key]))


def _floats(record: MetricRecord) -> dict[str, float]:
    """Every value of `record` as a float (the layout sends scalar metrics only)."""
    return {k: float(cast(float, v)) for k, v in record.items()}


def _metric_record(values: Mapping[str, float]) -> MetricRecord:
    """`values` as a MetricRecord (which copies them)."""
    metrics: dict[str, MetricRecordValues] = dict(values)
    return MetricRecord(metrics)


def federation(config: FederationConfig) -> ConfigRecord:
    """The config record every request carries."""
    return ConfigRecord({"federation": json.dumps(config.model_dump(mode="json"))})


def read_federation(msg: Message) -> FederationConfig:
    """The federation config of a request."""
    return FederationConfig.model_validate(json.loads(str(msg.content["config"]["federation"])))


def _party(party: int, domain: str, **extra: int) -> ConfigRecord:
    return ConfigRecord({"party": party, "domain": domain, **extra})


def description_content(description: Description) -> RecordDict:
    """A ``query`` reply."""
    return RecordDict(
        {
            "party": _party(description.party, description.domain, n_items=description.n_items),
            "table": ArrayRecord({"table": description.table}),
        }
    )


def read_description(msg: Message) -> Description:
    """The :class:`Description` of a ``query`` reply."""
    party = _config(msg.content, "party")
    return Description(
        _int(party, "party"),
        str(party["domain"]),
        _int(party, "n_items"),
        _arrays(msg.content, "table")["table"],
    )


def train_content(start: ArrayRecord, config: ConfigRecord) -> RecordDict:
    """A ``train`` request: the start weights and the forwarded config record."""
    return RecordDict({"arrays": start, "config": config})


def read_start(msg: Message) -> StateDict:
    """The start weights of a ``train`` request."""
    return _arrays(msg.content, "arrays")


def train_reply_content(party: int, reply: TrainReply) -> RecordDict:
    """A ``train`` reply: the update (one ArrayRecord), aggregate metrics, who sent it."""
    return RecordDict(
        {
            "update": ArrayRecord(reply.update),
            "metrics": _metric_record(reply.metrics),
            "party": _party(party, reply.domain),
        }
    )


def read_metrics(msg: Message) -> dict[str, float]:
    """The aggregate metrics of a ``train`` reply."""
    return _floats(cast(MetricRecord, msg.content["metrics"]))


def read_train_reply(msg: Message) -> TrainReply:
    """The :class:`TrainReply` of a ``train`` reply; a malformed one is a FedmergeError."""
    try:
        return TrainReply(
            str(msg.content["party"]["domain"]),
            _arrays(msg.content, "update"),
            read_metrics(msg),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise FedmergeError(f"malformed reply ({type(err).__name__}: {err})") from err


def evaluate_content(config: ConfigRecord, request: EvaluateRequest) -> RecordDict:
    """An ``evaluate`` request: the config record with what to evaluate, and each model."""
    asked = ConfigRecord(
        dict(config)
        | {
            "models": len(request.models),
            "splits": json.dumps(request.splits),
            "sample": request.sample,
        }
    )
    content = RecordDict({"config": asked})
    for index, weights in enumerate(request.models):
        content[f"model-{index}"] = ArrayRecord(weights)
    return content


def evaluate_asked(msg: Message) -> tuple[int, bool]:
    """How many models an ``evaluate`` request holds, and whether it samples the valid users."""
    asked = _config(msg.content, "config")
    return _int(asked, "models"), bool(asked["sample"])


def read_evaluate_request(msg: Message) -> EvaluateRequest:
    """The :class:`EvaluateRequest` of an ``evaluate`` request."""
    models, sample = evaluate_asked(msg)
    splits = tuple(json.loads(str(msg.content["config"]["splits"])))
    return EvaluateRequest(
        [_arrays(msg.content, f"model-{i}") for i in range(models)], splits, sample
    )


def evaluate_reply_content(party: int, domain: str, evaluations: list[Evaluation]) -> RecordDict:
    """An ``evaluate`` reply: aggregate metrics of each model on each split."""
    content = RecordDict({"party": _party(party, domain)})
    for index, evaluation in enumerate(evaluations):
        for split, values in evaluation.items():
            content[f"metrics-{index}-{split}"] = _metric_record(values)
    return content


def read_evaluations(msg: Message, models: int, splits: tuple[str, ...]) -> list[Evaluation]:
    """Each model's evaluation in an ``evaluate`` reply."""
    return [
        {
            split: _floats(cast(MetricRecord, msg.content[f"metrics-{i}-{split}"]))
            for split in splits
        }
        for i in range(models)
    ]


def sender(msg: Message) -> int:
    """The party id a reply names."""
    return _int(_config(msg.content, "party"), "party")


def leg_content(config: ConfigRecord, leg: Leg, carry: Carry) -> RecordDict:
    """A ``train.leg`` request: which leg, and the carry it starts from."""
    return RecordDict({"config": config, **_carry(leg, carry)})


def _carry(leg: Leg, carry: Carry) -> dict[str, ArrayRecord | ConfigRecord]:
    return {
        "leg": ConfigRecord(
            {
                "hybrid": leg.hybrid,
                "domain": leg.domain,
                "visit": leg.visit,
                "index": leg.index,
                "step": carry.step,
            }
        ),
        "weights": ArrayRecord(carry.weights),
        "moments": ArrayRecord(carry.moments),
    }


def read_leg(msg: Message) -> tuple[Leg, Carry]:
    """The leg and carry of a ``train.leg`` request or reply; a malformed one is refused."""
    try:
        record = _config(msg.content, "leg")
        leg = Leg(
            str(record["hybrid"]),
            str(record["domain"]),
            _int(record, "visit"),
            _int(record, "index"),
        )
        moments = cast(ArrayRecord, msg.content["moments"])
        carry = Carry(
            _arrays(msg.content, "weights"),
            moments.to_torch_state_dict() if len(moments) else {},
            _int(record, "step"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise FedmergeError(f"malformed leg ({type(err).__name__}: {err})") from err
    return leg, carry


def leg_reply_content(party: int, leg: Leg, carry: Carry) -> RecordDict:
    """A ``train.leg`` reply: the carry after the leg, and who trained it."""
    return RecordDict({"party": _party(party, leg.domain), **_carry(leg, carry)})
