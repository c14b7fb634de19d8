"""Flower ClientApp of a domain party: message in -> fedmerge call -> message out.

The party is resolved from the node config: ``domain`` (plus optional ``shard`` / ``shards``)
on a deployed SuperNode, or ``partition-id`` in simulation, mapped through the federation
config the server sends. Private data never leaves this process: replies hold the update, the
public item table (once, in the ``query`` reply), a woven adapter's carry (``train.leg``) and
aggregate metrics only; the wire layout lives in :mod:`server.records`.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmerge.errors import FedmergeError
from fedmerge.models import Part
from fedmerge.privacy import Ledger
from fedmerge.protocol import (
    FederationConfig,
    PartySpec,
    base_weights,
    describe,
    party_data,
    party_evaluate,
    party_leg,
    party_specs,
    party_train,
)
from server import secagg
from server.records import (
    description_content,
    evaluate_reply_content,
    leg_reply_content,
    read_evaluate_request,
    read_federation,
    read_leg,
    read_start,
    train_reply_content,
)

app = ClientApp()
LEDGER = "fedmerge.privacy"  # the node state's record of the party's privacy ledger
# (party, config) -> data, reused while this process serves the party
_DATA: dict[tuple[str, str], Part] = {}


def _spec(config: FederationConfig, context: Context) -> PartySpec:
    node = context.node_config
    if "domain" in node:
        domain, shard = str(node["domain"]), int(node.get("shard", 0))
        match = [s for s in party_specs(config) if s.domain == domain and s.shard == shard]
        if not match:
            raise FedmergeError(
                f"this SuperNode serves domain {domain!r} shard {shard}, which the run does not "
                f"have (domains {config.domains}, {config.parties_per_domain} parties each); start "
                "it with a --node-config domain of the run, or change the run's domains"
            )
        return match[0]
    return party_specs(config)[int(node["partition-id"])]


def _data(config: FederationConfig, spec: PartySpec) -> Part:
    key = (f"{spec.party}", config.model.model_dump_json() + str(config.seed))
    if key not in _DATA:
        _DATA.clear()  # one party per process at a time: keep memory flat
        _DATA[key] = party_data(spec, config)
    return _DATA[key]


def _party(msg: Message, context: Context) -> tuple[FederationConfig, PartySpec, Part]:
    config = read_federation(msg)
    spec = _spec(config, context)
    return config, spec, _data(config, spec)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this party is (id, domain, catalogue size) and its domain's public item table."""
    _, spec, part = _party(msg, context)
    return Message(description_content(describe(spec, part)), reply_to=msg)


@app.train(mods=[secagg.when_asked])
def train(msg: Message, context: Context) -> Message:
    """Fine-tune from the received weights; reply with the update and aggregate facts.

    The party's privacy ledger lives in the node's state for the whole run. In a SecAgg+ round
    (``privacy.mechanism = secagg``) the request and reply have SecAgg+'s layout, and what
    leaves the party is masked (:mod:`server.secagg`).
    """
    if secagg.is_secagg(msg):
        start, settings = secagg.read_fitins(msg)
        config = FederationConfig.model_validate(json.loads(str(settings["federation"])))
    else:
        start, config = read_start(msg), read_federation(msg)
    spec = _spec(config, context)
    part = _data(config, spec)
    kept = context.state.config_records.get(LEDGER)
    ledger = Ledger.from_json(str(kept["ledger"])) if kept else Ledger()
    reply = party_train(part, start, config, ledger=ledger, party=spec.party)
    context.state.config_records[LEDGER] = ConfigRecord({"ledger": ledger.to_json()})
    if secagg.is_secagg(msg):
        return Message(secagg.fitres_content(reply, start), reply_to=msg)
    return Message(train_reply_content(spec.party, reply), reply_to=msg)


@app.train("leg")
def leg(msg: Message, context: Context) -> Message:
    """Train one leg of a woven adapter from the carry received; reply with the carry after it.

    The base the adapter sits on is the run's seeded theta_0, rebuilt here (it never travels).
    """
    config, spec, part = _party(msg, context)
    weaving = config.weaving()
    if weaving is None:
        raise FedmergeError("a woven leg came for a run without target and sources")
    request, carry = read_leg(msg)
    start = base_weights(config, part.features.shape[1])
    after = party_leg(part, start, config, weaving, request, carry)
    return Message(leg_reply_content(spec.party, request, after), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate every received model on the private splits the server names.

    Reply with metrics only.
    """
    config, spec, part = _party(msg, context)
    request = read_evaluate_request(msg)
    evaluations = [
        party_evaluate(part, weights, config, request.splits, request.sample)
        for weights in request.models
    ]
    return Message(evaluate_reply_content(spec.party, spec.domain, evaluations), reply_to=msg)
