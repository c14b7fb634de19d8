"""The text-encoder recommender: token inputs, in-batch loss, training, checkpoints.

On tiny BERT configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.config import load_config
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.evaluate import evaluate_domain, model_scorer
from fedmerge.evaluate.popularity import popularity_scorer
from fedmerge.models import build_model, load_parts
from fedmerge.text import MiniLMEncoder, item_texts
from fedmerge.text.tokens import load_tokenizer, token_table
from fedmerge.train.checkpoint import load_checkpoint
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.run import train_run

TINY = [
    "model.pretrained=false",
    "model.dim=32",
    "model.layers=1",
    "model.heads=2",
    "model.item_tokens=16",
    "model.history_tokens=48",
    "train.lr=1e-3",
    "train.batch_size=32",
    "train.warmup_steps=5",
    "train.weight_decay=0",
    "train.patience=10",
]


def tiny(*extra: str) -> ExperimentConfig:
    return load_config("textenc", TINY + list(extra), ExperimentConfig)


def test_inputs_put_the_most_recent_item_first_and_respect_the_token_budget() -> None:
    model = build_model(tiny("model.history_tokens=12").model, 16, seed=0)
    cls, sep, pad = model.cls, model.sep, model.pad
    features = torch.tensor([[11, 12, 13] + [pad] * 13, [21, 22] + [pad] * 14, [31] + [pad] * 15])
    assert model.item_ids(features, torch.tensor([1, 2])).tolist() == [
        [cls, 21, 22, sep],
        [cls, 31, sep, pad],
    ]
    histories = torch.tensor([[0, 1, 2], [2, -1, -1]])
    assert model.history_ids(features, histories).tolist() == [
        [cls, 31, sep, 21, 22, sep, 11, 12, 13, sep],
        [cls, 31, sep, pad, pad, pad, pad, pad, pad, pad],
    ]
    long = torch.tensor([[0, 0, 0, 0, 0]])
    assert model.history_ids(features, long).shape[1] == 12  # cut at history_tokens


def test_in_batch_loss_does_not_count_a_repeated_target_as_a_negative() -> None:
    model = build_model(tiny().model, 16, seed=0).eval()
    features = torch.from_numpy(token_table(synthetic_domain("synth-0"), 16))
    same = torch.tensor([[1, 2, 5], [3, 4, 5]])
    assert model.loss(
        features, torch.tensor([[1, 2], [3, 4]]), same[:, 1:]
    ).item() == pytest.approx(0.0, abs=1e-6)
    assert (
        model.loss(features, torch.tensor([[1, 2], [3, 4]]), torch.tensor([[2, 5], [4, 6]])).item()
        > 0.01
    )


def test_every_domain_gets_the_same_layout_and_base(cache: Path) -> None:
    parts = load_parts(["synth-0", "synth-1"], tiny().model, quiet=True)
    a, b = (build_model(tiny().model, p.features.shape[1], seed=1) for p in parts)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert set(a.state_dict()) == set(b.state_dict())
    assert not torch.equal(
        build_model(tiny().model, 16, seed=2).encoder.embeddings.word_embeddings.weight,
        a.encoder.embeddings.word_embeddings.weight,
    )


def test_pretrained_start_scores_items_like_the_frozen_minilm_features() -> None:
    """Before fine-tuning, item vectors are exactly the all-MiniLM-L6-v2 features of item texts."""
    domain = synthetic_domain("synth-0")
    model = build_model(
        load_config("textenc", ["model.item_tokens=126"], ExperimentConfig).model, 126, seed=0
    ).eval()
    with torch.inference_mode():
        vectors = model.item_vectors(torch.from_numpy(token_table(domain, 126))[:20])
    texts = item_texts(domain)[:20]
    # nothing truncated either way
    assert max(len(load_tokenizer()(t)["input_ids"]) for t in texts) <= 128
    np.testing.assert_allclose(vectors.numpy(), MiniLMEncoder().encode(texts), atol=1e-5)


def test_training_beats_popularity_and_base_and_round_trips(tmp_path: Path, cache: Path) -> None:
    rows = train_run(["synth-0"], tiny("train.epochs=5"), tmp_path / "run", quiet=True)
    test = {r["model"]: r for r in rows if r["split"] == "test"}
    popularity = evaluate_domain(popularity_scorer, synthetic_domain("synth-0"), "test")
    assert test["textenc"]["recall@10"] > 2 * popularity["recall@10"]
    assert test["textenc"]["recall@10"] > 1.5 * test["base"]["recall@10"]
    losses = [
        h["loss"]
        for h in json.loads((tmp_path / "run" / "config.json").read_text())["history"]
        if "loss" in h
    ]
    assert losses[-1] < 0.8 * losses[0]
    model, config, _ = load_checkpoint(tmp_path / "run")
    assert config.model.kind == "textenc"
    part = load_parts(["synth-0"], config.model, quiet=True)[0]
    again = evaluate_domain(model_scorer(model, part.features), part.domain, "test")
    assert (
        again["recall@10"] == test["textenc"]["recall@10"]
        and again["ndcg@10"] == test["textenc"]["ndcg@10"]
    )
