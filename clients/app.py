"""Flower ClientApp of a domain party: message in -> fedmerge call -> message out.

The party is resolved from the node config: ``domain`` (plus optional ``shard`` / ``shards``)
on a deployed SuperNode, or ``partition-id`` in simulation, mapped through the federation
config the server sends. Private data never leaves this process: replies hold weights, the
public item-feature table and aggregate metrics only.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.errors import FedmergeError
from fedmerge.protocol import FederationConfig, PartySpec, party_data, party_evaluate, party_specs, party_train
from fedmerge.train.loop import Part

app = ClientApp()
_DATA: dict[tuple[str, str], Part] = {}  # (party, config) -> data, reused while this process serves the party


def _config(msg: Message) -> FederationConfig:
    return FederationConfig.model_validate(json.loads(str(msg.content["config"]["federation"])))


def _spec(config: FederationConfig, context: Context) -> PartySpec:
    node = context.node_config
    if "domain" in node:
        domain, shard = str(node["domain"]), int(node.get("shard", 0))
        match = [s for s in party_specs(config) if s.domain == domain and s.shard == shard]
        if not match:
            raise FedmergeError(f"this SuperNode serves domain {domain!r} shard {shard}, which the run does not have "
                                f"(domains {config.domains}, {config.parties_per_domain} parties each); "
                                "start it with a --node-config domain of the run, or change the run's domains")
        return match[0]
    return party_specs(config)[int(node["partition-id"])]


def _data(config: FederationConfig, spec: PartySpec) -> Part:
    key = (f"{spec.party}", config.model.model_dump_json() + str(config.seed))
    if key not in _DATA:
        _DATA.clear()  # one party per process at a time: keep memory flat
        _DATA[key] = party_data(spec, config)
    return _DATA[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this party is: its party id, domain and catalogue size."""
    config = _config(msg)
    spec = _spec(config, context)
    part = _data(config, spec)
    party = ConfigRecord({"party": spec.party, "domain": spec.domain, "n_items": part.domain.n_items,
                          "text_dim": int(part.features.shape[1])})
    return Message(RecordDict({"party": party}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune from the received weights; reply with weights, the item table and aggregate facts."""
    config = _config(msg)
    spec = _spec(config, context)
    reply = party_train(_data(config, spec), msg.content["arrays"].to_torch_state_dict(), config)
    content = RecordDict({"arrays": ArrayRecord(reply.weights), "features": ArrayRecord({"features": reply.features}),
                          "metrics": MetricRecord(reply.metrics),
                          "party": ConfigRecord({"party": spec.party, "domain": spec.domain})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate every received model on the private splits the server names; reply with metrics only."""
    config = _config(msg)
    spec = _spec(config, context)
    part = _data(config, spec)
    request = msg.content["config"]
    splits, sample = tuple(json.loads(str(request["splits"]))), bool(request["sample"])
    content = RecordDict({"party": ConfigRecord({"party": spec.party, "domain": spec.domain})})
    for index in range(int(request["models"])):  # type: ignore[arg-type]
        metrics = party_evaluate(part, msg.content[f"model-{index}"].to_torch_state_dict(), config, splits, sample)
        for split, values in metrics.items():
            content[f"metrics-{index}-{split}"] = MetricRecord(values)
    return Message(content, reply_to=msg)
