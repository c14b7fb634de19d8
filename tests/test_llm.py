"""The ``llm-lora`` family on a tiny random Llama with a real offline tokenizer (MiniLM's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from safetensors.torch import load_file, save_file

from fedmerge.config import load_config
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import EvalProtocol, candidate_lists, evaluate_domain, model_scorer
from fedmerge.merge.learn import LearnConfig, build_merged, parameter_groups
from fedmerge.merge.methods import prepare
from fedmerge.merge.pseudo import PseudoConfig
from fedmerge.merge.server import Member, MergeConfig, server_merge
from fedmerge.merge.vectors import combine, task_vector
from fedmerge.models import build_model, family
from fedmerge.models.llm import LlmLora, LlmLoraConfig, tiny_base
from fedmerge.models.lm_base import fingerprint
from fedmerge.protocol import FederationConfig, TrainReply
from fedmerge.text.tokens import minilm_folder
from fedmerge.train.checkpoint import load_checkpoint, save_weights
from server.records import read_train_reply, train_reply_content


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("llm") / "tiny", minilm_folder())


def tiny_llm(base: Path) -> list[str]:
    """The overrides that make a preset's language model the tiny one at `base`."""
    return [f"model.base={base}", "model.title_tokens=12", "model.prompt_tokens=96"]


def config(base: Path, **extra: object) -> LlmLoraConfig:
    return LlmLoraConfig.model_validate(
        {"base": str(base), "rank": 4, "title_tokens": 12, "prompt_tokens": 96} | extra
    )


def trained(model: LlmLora, seed: int) -> LlmLora:
    """`model` with a random (non-zero) adapter, as if fine-tuned."""
    generator = torch.Generator().manual_seed(seed)
    model.load_exchanged(
        {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in model.exchanged().items()}
    )
    return model


def logits(model: LlmLora, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.lm(input_ids=ids).logits


CENTRAL = [
    "privacy.epsilon=8",
    "merge.method=average",
    "merge.rows=method",
    "merge.learn.mode=none",
]
IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2054]])


def test_an_adapter_round_trips_exactly_through_a_flower_message(base: Path) -> None:
    model = trained(build_model(config(base), 12, 0), 1)
    sent = TrainReply("synth-0", model.exchanged(), {"users": 3.0})
    wire = recorddict_to_proto(train_reply_content(0, sent)).SerializeToString()
    content = recorddict_from_proto(ProtoRecordDict.FromString(wire))
    received = read_train_reply(SimpleNamespace(content=content))  # type: ignore[arg-type]
    assert set(received.update) == set(sent.update)
    assert all(torch.equal(received.update[k], v) for k, v in sent.update.items())
    assert all(".lora_" in k and v.dtype == torch.float32 for k, v in received.update.items())


def test_the_dense_merged_model_computes_what_the_adapter_does(base: Path) -> None:
    adapted = trained(build_model(config(base), 12, 0), 1)
    dense = build_model(config(base), 12, 0)
    dense.load_merged(dense.merge_space(adapted.exchanged()))
    assert torch.allclose(logits(dense, IDS), logits(adapted, IDS), atol=1e-5)
    assert not torch.allclose(logits(build_model(config(base), 12, 0), IDS), logits(adapted, IDS))
    assert all(not v.any() for k, v in dense.exchanged().items() if ".lora_B." in k)


def test_merging_identical_adapters_gives_that_adapter_and_lambda_0_the_base(base: Path) -> None:
    skeleton = build_model(config(base), 12, 0)
    start = skeleton.merge_space(skeleton.exchanged())
    one = skeleton.merge_space(trained(build_model(config(base), 12, 0), 1).exchanged())
    vector = task_vector(start, one)
    assert all(v.abs().max() > 0 for v in vector.values())
    for method, params in (("average", {}), ("task_arithmetic", {"lam": 0.5})):
        merged = prepare(method, [vector, vector], params)
        result = combine(start, merged.vectors, merged.weights)
        assert all(torch.allclose(result[k], one[k], atol=1e-6) for k in one)
    nothing = prepare("task_arithmetic", [vector, vector], {"lam": 0.0})
    base_model = build_model(config(base), 12, 0)
    base_model.load_merged(combine(start, nothing.vectors, nothing.weights))
    assert torch.equal(logits(base_model, IDS), logits(build_model(config(base), 12, 0), IDS))


def test_ties_over_delta_w_at_density_1_with_agreeing_signs_is_task_arithmetic(base: Path) -> None:
    skeleton = build_model(config(base), 12, 0)
    start = skeleton.merge_space(skeleton.exchanged())
    one = task_vector(
        start, skeleton.merge_space(trained(build_model(config(base), 12, 0), 1).exchanged())
    )
    two = {k: 3.0 * v for k, v in one.items()}  # same signs everywhere
    ties = prepare("ties", [one, two], {"density": 1.0, "lam": 1.0})
    arithmetic = prepare("task_arithmetic", [one, two], {"lam": 0.5})
    ties_merge = combine(start, ties.vectors, ties.weights)
    arithmetic_merge = combine(start, arithmetic.vectors, arithmetic.weights)
    assert all(torch.allclose(ties_merge[k], arithmetic_merge[k], atol=1e-6) for k in start)


def test_candidate_scores_with_the_shared_prompt_cache_match_scoring_each_pair_alone(
    base: Path, cache: Path
) -> None:
    model = trained(build_model(config(base), 12, 0), 2).eval()
    domain = synthetic_domain("synth-0")
    table = family("llm-lora").catalogue(domain, model.config)
    histories = torch.tensor([[1, 2, 3, -1], [4, 5, 6, 7]])
    candidates = torch.tensor([[0, 7, 8, 9], [9, 10, 11, 30]])
    with torch.no_grad():
        shared = model.candidate_scorer(table)(histories, candidates)
        for row in range(2):
            prompt = model._prompt(table, histories[row])
            for column, item in enumerate(candidates[row].tolist()):
                answer = model._answer(table, item)
                ids = torch.tensor([prompt + answer])
                logp = torch.log_softmax(model.lm(input_ids=ids).logits[0], -1)
                alone = np.mean([float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(answer)])
                assert float(shared[row, column]) == pytest.approx(alone, abs=1e-4)


def test_the_loss_reads_only_the_answer_and_trains_only_the_adapter(
    base: Path, cache: Path
) -> None:
    model = build_model(config(base), 12, 0)
    table = family("llm-lora").catalogue(synthetic_domain("synth-0"), model.config)
    inputs, targets = torch.tensor([[1, 2, 3, -1]]), torch.tensor([[2, 3, 9, -1]])
    loss = model.loss(table, inputs, targets)
    loss.backward()
    trained_names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained_names and all(".lora_" in n for n in trained_names)
    # the answer is item 9's title and the end token: the same example scored by hand
    model.zero_grad()
    with torch.no_grad():
        prompt, answer = model._prompt(table, inputs[0]), model._answer(table, 9)
        logp = torch.log_softmax(model.lm(input_ids=torch.tensor([prompt + answer])).logits[0], -1)
        by_hand = -np.mean([float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(answer)])
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-4)
    assert model.record_losses(table, inputs, targets).tolist() == pytest.approx(
        [float(loss.detach())], rel=1e-5
    )


def test_every_model_is_ranked_on_the_same_saved_candidate_lists(base: Path, cache: Path) -> None:
    domain = synthetic_domain("synth-0")
    protocol = EvalProtocol(candidates=5, users=6, seed=1)
    table = family("llm-lora").catalogue(domain, config(base))
    first = candidate_lists(domain, "test", protocol)
    results = [
        evaluate_domain(
            model_scorer(trained(build_model(config(base), 12, 0), s), table),
            domain,
            "test",
            4,
            protocol=protocol,
        )
        for s in (1, 2)
    ]
    assert np.array_equal(candidate_lists(domain, "test", protocol), first)
    assert all(r["users"] == 6 for r in results)
    with pytest.raises(FedmergeError, match="ranks candidate lists only"):
        evaluate_domain(model_scorer(build_model(config(base), 12, 0), table), domain, "test")


def test_bad_input_gets_one_clear_error(base: Path, tmp_path: Path, cache: Path) -> None:
    with pytest.raises(FedmergeError, match="not a Hugging Face model folder"):
        build_model(config(tmp_path / "missing"), 12, 0)
    (tmp_path / "not-lm").mkdir()
    (tmp_path / "not-lm" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FedmergeError, match="does not hold a causal language model"):
        build_model(config(tmp_path / "not-lm"), 12, 0)
    with pytest.raises(ValueError, match="title_tokens = 96 does not fit"):
        config(base, title_tokens=96)
    with pytest.raises(FedmergeError, match="raise prompt_tokens or lower title_tokens"):
        build_model(config(base, title_tokens=80), 80, 0)
    other_rank = build_model(config(base, rank=2), 12, 0).exchanged()
    with pytest.raises(FedmergeError, match="another LoRA rank"):
        build_model(config(base), 12, 0).load_exchanged(other_rank)
    with pytest.raises(FedmergeError, match="another base model or targets"):
        build_model(config(base, targets=["q_proj"]), 12, 0).load_exchanged(other_rank)
    with pytest.raises(FedmergeError, match="at most 199 negatives, not 500"):
        candidate_lists(synthetic_domain("synth-0"), "test", EvalProtocol(candidates=500))
    # another base of the same shapes: a copy with one weight changed
    other = tmp_path / "other"
    shutil.copytree(base, other)
    weights = load_file(other / "model.safetensors")
    first = sorted(weights)[0]
    save_file(weights | {first: weights[first] + 1.0}, other / "model.safetensors")
    assert fingerprint(other) != fingerprint(base)
    state = build_model(config(base), 12, 0).state_dict()
    with pytest.raises(FedmergeError, match=f"trained on base model {fingerprint(base)}, but"):
        build_model(config(other), 12, 0).load_state_dict(state)
    with pytest.raises(FedmergeError, match=f"fingerprint {fingerprint(other)}, not model.base_"):
        build_model(config(other, base_hash=fingerprint(base)), 12, 0)
    build_model(config(base, base_hash=fingerprint(base)), 12, 0).load_state_dict(state)


def test_llm_parties_send_adapters_only_and_both_backends_agree(
    base: Path, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_flower import on_both_backends

    config = load_config(
        "simulate-llm",
        [
            'domains=["synth-0", "synth-1"]',
            *tiny_llm(base),
            "train.evaluation.users=12",
            "train.valid_users=12",
            "train.lr=5e-3",
            "rounds=2",  # round 2 starts from the merged dense weights
        ],
        FederationConfig,
    )
    flower, inprocess, grids = on_both_backends(config, tmp_path, monkeypatch)
    assert flower == inprocess
    assert {r["protocol"] for r in flower} == {"19 uniform negatives, seed 0, 12 users sampled"}
    replies = [
        m
        for m in grids[0].seen
        if m.metadata.reply_to_message_id and m.metadata.message_type == "train"
    ]
    assert len(replies) == 4  # two parties, two rounds
    adapter = set(build_model(config.model, 12, 0).exchanged())
    for msg in replies:
        update = read_train_reply(msg).update
        assert set(update) == adapter  # the LoRA factors, nothing of the base model
        assert all(v.dtype == torch.float32 for v in update.values())


def test_summing_mechanisms_are_refused_for_adapters(base: Path) -> None:
    for mode, extra in (("secagg", ["parties_per_domain=2"]), ("central-dp", CENTRAL)):
        with pytest.raises(FedmergeError, match="do not add up"):
            load_config(
                "simulate-llm",
                [f"model.base={base}", f"privacy.mechanism={mode}", *extra],
                FederationConfig,
            )


@pytest.mark.parametrize("walk", [1, 3], ids=["one-item", "walks"])
def test_the_learned_merge_on_candidate_lists_lowers_its_loss_and_moves_only_coefficients(
    base: Path, cache: Path, walk: int
) -> None:
    model_config = config(base)
    domains = [synthetic_domain(name) for name in ("synth-0", "synth-1")]
    tables = [family("llm-lora").catalogue(d, model_config) for d in domains]
    skeleton = build_model(model_config, 12, 0)
    start = skeleton.merge_space(skeleton.exchanged())
    members = [
        Member(
            d.name,
            task_vector(
                start,
                skeleton.merge_space(trained(build_model(model_config, 12, 0), s).exchanged()),
            ),
            table,
        )
        for s, d, table in zip((1, 2), domains, tables, strict=True)
    ]
    learn = LearnConfig(
        mode="layer-wise",
        steps=12,
        lr=0.05,
        batch_size=16,  # every pseudo-user in every step: the loss is one function of w
        temperature=1.0,
        candidates=5,
        pseudo=PseudoConfig(selection="random", count=8, walk_length=walk, mixed_lengths=True),
    )
    merge = MergeConfig(method="ties", rows="method", learn=learn)
    outcome = server_merge(start, members, model_config, 0, merge)
    losses = [entry["loss"] for entry in outcome.coefficients["log"]]
    assert losses[-1] < losses[0]
    assert outcome.coefficients["groups"] == ["layer 0", "layer 1"]
    weights = torch.tensor(outcome.coefficients["weights"])
    assert not torch.equal(weights, torch.ones_like(weights))
    # the merged weights are the base plus the coefficients times the TIES vectors, nothing else
    prepared = prepare("ties", [m.vector for m in members])
    group_of, _ = parameter_groups(skeleton, list(start), "layer-wise")
    rebuilt = build_merged(start, prepared.vectors, weights, group_of)
    assert set(outcome.merged) == set(start)
    assert all(torch.allclose(outcome.merged[k], rebuilt[k], atol=1e-6) for k in start)
    with pytest.raises(FedmergeError, match="learn.candidates = 500 but a catalogue has only 200"):
        server_merge(
            start,
            members,
            model_config,
            0,
            merge.model_copy(update={"learn": learn.model_copy(update={"candidates": 500})}),
        )


def test_train_merge_and_evaluate_from_the_command_line(
    base: Path, tmp_path: Path, cache: Path
) -> None:
    from tests.test_cli import run_cli

    sets = [
        *tiny_llm(base),
        "train.epochs=1",
        "train.batches_per_epoch=2",
        "train.valid_users=4",
        "train.evaluation.users=4",
    ]
    options = [x for item in sets for x in ("--set", item)]
    for name in ("synth-0", "synth-1"):
        out = run_cli(
            "train", "--model", "llm-lora", "--domain", name, "--out", str(tmp_path / name),
            *options, cache=cache,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    # adapters that surely moved (two batches on a tiny model may keep epoch 0)
    for seed, name in enumerate(("synth-0", "synth-1"), 1):
        model = trained(load_checkpoint(tmp_path / name)[0], seed)
        save_weights(model, tmp_path / name / "model.safetensors")
    merged = tmp_path / "merged"
    out = run_cli(
        "merge", "--base", str(tmp_path / "synth-0" / "base.safetensors"),
        "--models", f"{tmp_path / 'synth-0'},{tmp_path / 'synth-1'}",
        "--domains", "synth-0,synth-1", "--method", "average", "--learn", "none",
        "--rows", "method", "--out", str(merged), cache=cache,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads((merged / "metrics.json").read_text())
    assert {(r["domain"], r["protocol"]) for r in rows} == {
        (d, "19 uniform negatives, seed 0, 4 users sampled") for d in ("synth-0", "synth-1")
    }
    # the merged checkpoint is the base with the mean Delta W folded in
    members = [load_checkpoint(tmp_path / d)[0] for d in ("synth-0", "synth-1")]
    states = [m.merge_space(m.exchanged()) for m in members]
    folded = load_checkpoint(merged)[0]
    weights = folded.merge_space(folded.exchanged())
    assert not torch.equal(states[0][first := sorted(weights)[0]], states[1][first])
    assert all(torch.allclose(weights[k], (states[0][k] + states[1][k]) / 2) for k in weights)
    out = run_cli(
        "evaluate", "--checkpoint", str(merged), "--domain", "synth-0", "--candidates", "5",
        "--split", "test", cache=cache,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
