"""Pseudo-users, teachers, learned merge coefficients and `fedmerge merge`.

On tiny models of synthetic domains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from fedmerge.errors import FedmergeError
from fedmerge.evaluate import evaluate_domain, model_scorer
from fedmerge.merge import prepare, task_vector
from fedmerge.merge.learn import (
    LearnConfig,
    _chances,
    _pool,
    _Student,
    _without_last,
    build_merged,
    learn_coefficients,
    parameter_groups,
    server_domain,
)
from fedmerge.merge.losses import LOSSES, kd, mergerec
from fedmerge.merge.pseudo import (
    PseudoConfig,
    candidate_walk_users,
    one_item_users,
    select_items,
    walk_users,
)
from fedmerge.merge.run import merge_run
from fedmerge.merge.server import Member, MergeConfig, server_merge
from fedmerge.merge.teacher import neighbours, teacher_scores
from fedmerge.models import build_model, load_parts
from fedmerge.train.checkpoint import load_checkpoint
from fedmerge.train.run import train_run
from tests.test_cli import run_cli
from tests.test_train import tiny

DOMAINS = ["synth-0", "synth-1", "synth-2"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three tiny textseq models fine-tuned from one seeded base, one per synthetic domain."""
    root = tmp_path_factory.mktemp("finetuned")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDMERGE_DATA", str(root / "cache"))
        for name in DOMAINS:
            train_run([name], tiny("train.epochs=8"), root / name, quiet=True)
        parts = load_parts(DOMAINS, tiny().model, quiet=True)
    models = [load_checkpoint(root / name)[0] for name in DOMAINS]
    base = load_file(str(root / DOMAINS[0] / "base.safetensors"))
    return {"root": root, "parts": parts, "models": models, "base": base}


def _server(finetuned: dict, config: LearnConfig) -> list:
    return [
        server_domain(p.domain.name, p.features, m, config)
        for p, m in zip(finetuned["parts"], finetuned["models"], strict=True)
    ]


def test_sparse_teacher_keeps_top_k_probabilities_and_tail_mass(finetuned: dict) -> None:
    part, model = finetuned["parts"][0], finetuned["models"][0]
    users = one_item_users(torch.arange(30))
    dense = teacher_scores(model, part.features, users, top_k=0, temperature=0.05)
    sparse = teacher_scores(model, part.features, users, top_k=20, temperature=0.05)
    rows = torch.arange(30)
    p_full = torch.softmax(dense.dense(rows) / 0.05, 1)
    p_sparse = torch.softmax(sparse.dense(rows) / 0.05, 1)
    top = sparse.indices.long()
    torch.testing.assert_close(p_sparse.gather(1, top), p_full.gather(1, top), rtol=1e-4, atol=1e-6)
    assert sparse.nbytes < dense.nbytes / 4


def test_pseudo_user_selections_and_walks(finetuned: dict) -> None:
    part, model = finetuned["parts"][0], finetuned["models"][0]
    n = len(part.features)
    assert torch.equal(select_items(part.features, PseudoConfig()), torch.arange(n))
    chosen = select_items(part.features, PseudoConfig(selection="random", count=50, seed=1))
    assert len(chosen.unique()) == 50 and torch.equal(
        chosen, select_items(part.features, PseudoConfig(selection="random", count=50, seed=1))
    )
    centroids = select_items(part.features, PseudoConfig(selection="kmeans", count=16))
    assert len(centroids.unique()) == 16
    near = neighbours(model, part.features, top=5, temperature=0.05)
    assert near.shape == (n, 5) and not (near == torch.arange(n)[:, None]).any()
    walks = walk_users(torch.arange(10), near, length=4, seed=0)
    assert walks.histories.shape == (10, 4) and torch.equal(walks.items, walks.histories[:, -1])
    assert all(
        int(walks.histories[i, t + 1]) in near[int(walks.histories[i, t])].tolist()
        for i in range(10)
        for t in range(3)
    )
    mixed = walk_users(torch.arange(200), near, length=4, seed=0, mixed=True)
    kept = (mixed.histories >= 0).sum(1)
    assert set(kept.tolist()) == {1, 2, 3, 4} and torch.equal(
        mixed.items, mixed.histories[torch.arange(200), kept - 1]
    )
    full = walk_users(torch.arange(200), near, length=4, seed=0)  # the same walks, cut
    assert torch.equal(mixed.histories[mixed.histories >= 0], full.histories[mixed.histories >= 0])
    # the same walks, one step on
    ahead = walk_users(torch.arange(200), near, length=4, seed=0, next_item=True)
    assert torch.equal(ahead.histories, full.histories)
    assert all(int(ahead.items[i]) in near[int(full.histories[i, -1])].tolist() for i in range(200))
    ahead = walk_users(torch.arange(200), near, length=4, seed=0, mixed=True, next_item=True)
    kept = (ahead.histories >= 0).sum(1)
    assert all(
        int(ahead.items[i]) in near[int(ahead.histories[i, kept[i] - 1])].tolist()
        for i in range(200)
    )


def test_candidate_walks_step_to_the_best_of_each_pool_given_the_walk_so_far() -> None:
    seen: list[int] = []

    def nearest_above(walks: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        seen.append(walks.shape[1])
        return -(pool - walks[:, -1:]).abs() + 1e-3 * pool  # a tie goes to the item above

    starts = torch.tensor([5, 10, 0])
    # the pool is every other item: the best is always the item above the current one
    walks = candidate_walk_users(starts, nearest_above, 20, length=3, top=1, pool=19, seed=0)
    assert torch.equal(walks.histories, torch.tensor([[5, 6, 7], [10, 11, 12], [0, 1, 2]]))
    assert torch.equal(walks.items, torch.tensor([7, 12, 2])) and seen == [1, 2]
    # small pools: every step is another item than the current one, one of its pool's best two
    walks = candidate_walk_users(
        torch.arange(50), nearest_above, 50, length=4, top=2, pool=5, seed=1, mixed=True
    )
    kept = (walks.histories >= 0).sum(1)
    assert set(kept.tolist()) == {1, 2, 3, 4}
    assert torch.equal(walks.items, walks.histories[torch.arange(50), kept - 1])
    steps = walks.histories[:, 1:] - walks.histories[:, :-1]
    assert ((steps != 0) | (walks.histories[:, 1:] < 0)).all()
    again = candidate_walk_users(
        torch.arange(50), nearest_above, 50, length=4, top=2, pool=5, seed=1, mixed=True
    )
    assert torch.equal(again.histories, walks.histories)


def test_learned_merge_lowers_its_loss_and_moves_only_the_coefficients(finetuned: dict) -> None:
    base, models = finetuned["base"], finetuned["models"]
    prepared = prepare(
        "task_arithmetic", [task_vector(base, m.state_dict()) for m in models], {"lam": 0.3}
    )
    config = LearnConfig(steps=80, lr=1e-2)
    skeleton = build_model(tiny().model, 64, seed=0)
    result = learn_coefficients(
        skeleton, base, prepared, _server(finetuned, config), config, quiet=True
    )
    losses = [e["loss"] for e in result.log]
    assert len(losses) == 80 and np.mean(losses[-20:]) < np.mean(losses[:20])
    assert not torch.equal(result.weights, torch.full((3, 1), 0.3))
    groups = parameter_groups(skeleton, list(prepared.vectors[0]), "task-wise")[0]
    expected = build_merged(base, prepared.vectors, result.weights, groups)
    # the merge is theta_0 + sum_k w_k tau~_k
    assert all(torch.equal(result.merged[k], expected[k]) for k in base)


def test_next_item_pseudo_users_leave_the_history_s_last_item_out_of_the_loss(
    finetuned: dict,
) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = (
        torch.randn(3, 12, generator=generator),
        torch.randn(3, 12, generator=generator),
    )
    histories, own = torch.tensor([[4, -1], [2, 5], [9, -1]]), torch.tensor([6, 1, 0])
    bumped = student.clone()
    bumped[[0, 1, 2], [4, 5, 9]] += 5.0  # the last items scored far above everything
    losses = [
        mergerec(*_without_last(histories, s, teacher), own, 0.05, 2.5) for s in (student, bumped)
    ]
    assert torch.isfinite(losses[0]) and losses[0] == pytest.approx(float(losses[1]), rel=1e-5)
    assert (
        mergerec(bumped, teacher, own, 0.05, 2.5) > mergerec(student, teacher, own, 0.05, 2.5) + 1.0
    )
    base, models = finetuned["base"], finetuned["models"]
    prepared = prepare(
        "task_arithmetic", [task_vector(base, m.state_dict()) for m in models], {"lam": 0.3}
    )
    config = LearnConfig(steps=40, lr=1e-2, pseudo=PseudoConfig(target="next"))
    domains = _server(finetuned, config)
    # own item: the step after
    assert not any((d.users.items == d.users.histories[:, 0]).any() for d in domains)
    result = learn_coefficients(
        build_model(tiny().model, 64, seed=0), base, prepared, domains, config, quiet=True
    )
    losses = [e["loss"] for e in result.log]
    assert all(np.isfinite(losses)) and np.mean(losses[-10:]) < np.mean(losses[:10])


def test_item_vectors_say_which_candidates_follow_the_coefficients(finetuned: dict) -> None:
    base, models, part = finetuned["base"], finetuned["models"], finetuned["parts"][0]
    prepared = prepare(
        "task_arithmetic", [task_vector(base, m.state_dict()) for m in models], {"lam": 0.3}
    )
    initial, moved = (
        build_model(tiny().model, 64, seed=0).eval(),
        build_model(tiny().model, 64, seed=0).eval(),
    )
    groups = parameter_groups(initial, list(prepared.vectors[0]), "task-wise")[0]
    initial.load_state_dict(build_merged(base, prepared.vectors, torch.full((3, 1), 0.3), groups))
    moved.load_state_dict(
        build_merged(base, prepared.vectors, torch.tensor([[0.9], [0.1], [0.5]]), groups)
    )
    histories = torch.tensor([[3, -1], [5, 7]])
    with torch.no_grad():
        fixed, current = initial.item_vectors(part.features), moved.item_vectors(part.features)
        params = {f"model.{k}": v for k, v in moved.state_dict().items()}
        scores = {
            mode: torch.func.functional_call(
                _Student(initial, mode), params, (part.features, fixed, histories)
            )
            for mode in ("fixed", "history", "current")
        }
        users = moved.user_vectors(current, histories)
        text = moved.text_scores(part.features, torch.tensor([3, 7]))
    # the merged model's own scores
    torch.testing.assert_close(scores["current"], users @ current.T + text)
    # MergeRec: candidates from the initial merge
    torch.testing.assert_close(scores["fixed"], users @ fixed.T + text)
    read = fixed.index_put((torch.tensor([3, 5, 7]),), current[[3, 5, 7]])
    # the history items move as candidates too
    torch.testing.assert_close(scores["history"], users @ read.T + text)
    assert not torch.allclose(scores["fixed"], scores["history"]) and not torch.allclose(
        scores["fixed"], scores["current"]
    )
    losses = []
    for mode in ("fixed", "history", "current"):
        config = LearnConfig(steps=3, item_vectors=mode, lr=1e-2)
        result = learn_coefficients(
            build_model(tiny().model, 64, seed=0),
            base,
            prepared,
            _server(finetuned, config),
            config,
            quiet=True,
        )
        losses.append([e["loss"] for e in result.log])
    # all agree at the initial merge
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5) == losses[2][0]
    assert losses[0][1:] != pytest.approx(losses[1][1:], rel=1e-6)


def test_fitted_scale_makes_the_kl_blind_to_the_students_sharpness(finetuned: dict) -> None:
    teacher = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)) * 0.2
    own = torch.arange(4)
    assert kd(teacher, teacher, own, 0.05, 2.5) == pytest.approx(0.0, abs=1e-6)
    # a sharper student with the same ranking pays ...
    assert kd(3 * teacher, teacher, own, 0.05, 2.5) > 1.0
    # ... unless scaled
    assert kd(3 * teacher, teacher, own, 0.05, 2.5, scale=1 / 3) == pytest.approx(0.0, abs=1e-5)
    base, models = finetuned["base"], finetuned["models"]
    prepared = prepare(
        "task_arithmetic", [task_vector(base, m.state_dict()) for m in models], {"lam": 0.3}
    )
    for loss, moves in (("kd", True), ("adamerging", False)):
        config = LearnConfig(steps=5, loss=loss)
        log = learn_coefficients(
            build_model(tiny().model, 64, seed=0),
            base,
            prepared,
            _server(finetuned, config),
            config,
            quiet=True,
        ).log
        assert (log[-1]["scales"] != [1.0] * 3) == moves  # only losses with a teacher fit a scale


def test_the_loss_setting_takes_exactly_the_registered_losses() -> None:
    assert [LearnConfig(loss=name).loss for name in LOSSES] == list(LOSSES)
    with pytest.raises(ValidationError, match="'mergerec', 'kd', 'ce' or 'adamerging'"):
        LearnConfig(loss="entropy")


def test_balanced_sampling_gives_every_domain_the_same_mass() -> None:
    pool = _pool([one_item_users(torch.arange(n)) for n in (300, 30, 3)])
    chance = _chances(pool)
    assert chance.sum() == pytest.approx(1.0)
    assert [chance[pool[:, 0] == k].sum() for k in range(3)] == pytest.approx([1 / 3] * 3)
    assert chance[pool[:, 0] == 2][0] == pytest.approx(100 * chance[pool[:, 0] == 0][0])


def test_layer_and_tensor_wise_with_equal_groups_match_task_wise(finetuned: dict) -> None:
    base, models = finetuned["base"], finetuned["models"]
    prepared = prepare(
        "ties", [task_vector(base, m.state_dict()) for m in models], {"density": 0.5}
    )
    keys, model = list(prepared.vectors[0]), build_model(tiny().model, 64, seed=0)
    layer_groups, names = parameter_groups(model, keys, "layer-wise")
    assert names == ["others", "block 0"] and layer_groups["blocks.layers.0.linear1.weight"] == 1
    tensor_groups, tensor_names = parameter_groups(model, keys, "tensor-wise")
    assert tensor_names == keys and sorted(tensor_groups.values()) == list(range(len(keys)))
    task_groups, _ = parameter_groups(model, keys, "task-wise")
    w = torch.tensor([[0.7], [1.1], [0.4]])
    one = build_merged(base, prepared.vectors, w, task_groups)
    for groups, count in ((layer_groups, len(names)), (tensor_groups, len(keys))):
        many = build_merged(base, prepared.vectors, w.repeat(1, count), groups)
        assert all(torch.equal(one[k], many[k]) for k in base)
    losses = []
    for mode in ("task-wise", "layer-wise", "tensor-wise"):
        config = LearnConfig(mode=mode, steps=1)
        skeleton = build_model(tiny().model, 64, seed=0)
        losses.append(
            learn_coefficients(
                skeleton, base, prepared, _server(finetuned, config), config, quiet=True
            ).log[0]["loss"]
        )
    assert losses[1:] == pytest.approx([losses[0]] * 2, rel=1e-5)


def test_merge_beats_the_worst_single_model_on_every_domain(
    finetuned: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMERGE_DATA", str(finetuned["root"] / "cache"))
    root = finetuned["root"]
    rows, _ = merge_run(
        root / DOMAINS[0] / "base.safetensors",
        [root / d for d in DOMAINS],
        DOMAINS,
        MergeConfig(learn=LearnConfig(steps=100)),
        tmp_path / "merged",
        quiet=True,
    )
    merged = {r["domain"]: r["recall@10"] for r in rows if r["split"] == "test"}
    for part in finetuned["parts"]:
        singles = [
            evaluate_domain(model_scorer(m, part.features), part.domain, "test")["recall@10"]
            for m in finetuned["models"]
        ]
        assert merged[part.domain.name] > min(singles), (part.domain.name, merged, singles)
    coefficients = json.loads((tmp_path / "merged" / "coefficients.json").read_text())
    assert len(coefficients["log"]) == 100 and coefficients["teacher_bytes"] > 0
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "coefficients.json",
        "config.json",
        "merged.safetensors",
        "metrics.csv",
        "metrics.json",
        "run.json",
    ]
    # a merge folder is a checkpoint `evaluate` can read
    model, _, _ = load_checkpoint(tmp_path / "merged")
    again = evaluate_domain(
        model_scorer(model, finetuned["parts"][1].features), finetuned["parts"][1].domain, "test"
    )
    assert again["recall@10"] == merged["synth-1"]


def test_valid_candidates_keep_the_snapshot_the_parties_score_best(
    finetuned: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMERGE_DATA", str(finetuned["root"] / "cache"))
    root, parts = finetuned["root"], finetuned["parts"]
    merge = MergeConfig(
        method="task_arithmetic",
        params={"lam": 0.3},
        learn=LearnConfig(steps=30, lr=2e-2, valid_candidates=4),
    )
    rows, outcome = merge_run(
        root / DOMAINS[0] / "base.safetensors",
        [root / d for d in DOMAINS],
        DOMAINS,
        merge,
        tmp_path / "m",
        quiet=True,
    )
    selection = outcome.coefficients["selection"]
    assert selection["steps"] == [0, 10, 20, 30]
    scores, chosen = selection["scores"], selection["chosen_step"]
    assert (
        chosen == selection["steps"][scores.index(max(scores))] == outcome.coefficients["best_step"]
    )
    # the kept merge is the chosen snapshot, scored as the parties score it (their rows of the
    # written merge)
    assert max(scores) == pytest.approx(
        float(np.mean([r["ndcg@10"] for r in rows if r["split"] == "valid"])), abs=1e-6
    )
    log = outcome.coefficients["log"]
    assert outcome.coefficients["weights"] == (
        log[chosen - 1]["weights"] if chosen else [[0.3]] * 3
    )
    skeleton = build_model(tiny().model, 64, seed=0)  # candidate 0 is the training-free merge
    skeleton.load_exchanged(outcome.initial)
    first = np.mean(
        [
            evaluate_domain(model_scorer(skeleton, p.features), p.domain, "valid")["ndcg@10"]
            for p in parts
        ]
    )
    assert scores[0] == pytest.approx(float(first), abs=1e-6)


def test_the_judge_decides_and_valid_selection_needs_one(finetuned: dict) -> None:
    base, models, parts = finetuned["base"], finetuned["models"], finetuned["parts"]
    members = [
        Member(p.domain.name, task_vector(base, m.exchanged()), p.features)
        for p, m in zip(parts, models, strict=True)
    ]
    merge = MergeConfig(
        method="task_arithmetic",
        params={"lam": 0.3},
        rows="method",
        learn=LearnConfig(steps=20, lr=2e-2, valid_candidates=3),
    )
    outcome = server_merge(
        base, members, tiny().model, 0, merge, judge=lambda candidates: [0.1, 0.3, 0.2]
    )
    # step 10, the second candidate
    weights = torch.tensor(outcome.coefficients["log"][9]["weights"])
    assert outcome.coefficients["selection"]["chosen_step"] == 10
    assert outcome.coefficients["weights"] == weights.tolist()
    vectors = [task_vector(base, m.state_dict()) for m in models]
    expected = build_merged(base, vectors, weights, {k: 0 for k in vectors[0]})
    assert all(torch.equal(outcome.merged[k], expected[k]) for k in expected)
    with pytest.raises(FedmergeError, match="valid_scales need the parties"):
        server_merge(base, members, tiny().model, 0, merge)
    with pytest.raises(FedmergeError, match="only the initial merge"):
        LearnConfig(valid_candidates=1)


def test_valid_scales_keep_the_learned_shape_at_the_size_the_parties_choose(
    finetuned: dict,
) -> None:
    base, models, parts = finetuned["base"], finetuned["models"], finetuned["parts"]
    members = [
        Member(p.domain.name, task_vector(base, m.exchanged()), p.features)
        for p, m in zip(parts, models, strict=True)
    ]
    merge = MergeConfig(
        method="task_arithmetic",
        params={"lam": 0.3},
        rows="method",
        learn=LearnConfig(mode="layer-wise", steps=20, lr=2e-2, valid_scales=[0.5, 1.0]),
    )
    outcome = server_merge(
        base, members, tiny().model, 0, merge, judge=lambda candidates: [0.1, 0.3, 0.2]
    )
    # the initial merge, then the last step times each scale
    selection = outcome.coefficients["selection"]
    assert (selection["steps"], selection["scales"]) == ([0, 20, 20], [1.0, 0.5, 1.0])
    assert (selection["chosen_step"], selection["chosen_scale"]) == (20, 0.5)
    last = torch.tensor(outcome.coefficients["log"][-1]["weights"])
    assert not torch.allclose(last, torch.full_like(last, 0.3))  # learning moved the coefficients
    assert torch.equal(torch.tensor(outcome.coefficients["weights"]), last * 0.5)
    vectors = [task_vector(base, m.state_dict()) for m in models]
    group_of, _ = parameter_groups(
        build_model(tiny().model, 64, seed=0), list(vectors[0]), "layer-wise"
    )
    expected = build_merged(base, vectors, last * 0.5, group_of)
    assert all(torch.equal(outcome.merged[k], expected[k]) for k in expected)
    kept_initial = server_merge(
        base, members, tiny().model, 0, merge, judge=lambda candidates: [0.3, 0.1, 0.3]
    )
    assert all(torch.equal(kept_initial.merged[k], kept_initial.initial[k]) for k in expected)
    untrained = MergeConfig(
        method="task_arithmetic",
        params={"lam": 0.3},
        rows="method",
        # nothing learned: the initial size
        learn=LearnConfig(mode="none", valid_scales=[0.5]),
    )
    sized = server_merge(
        base, members, tiny().model, 0, untrained, judge=lambda candidates: [0.1, 0.3]
    )
    assert sized.coefficients["selection"]["scales"] == [1.0, 0.5]
    assert sized.coefficients["weights"] == [[pytest.approx(0.15)]] * 3
    expected = build_merged(
        base, vectors, torch.full((3, 1), 0.3) * 0.5, {k: 0 for k in vectors[0]}
    )
    assert all(torch.equal(sized.merged[k], expected[k]) for k in expected)
    # a factor 1.0 with nothing learned, or a repeated one, is the same merge: scored once
    scored: list[int] = []
    repeated = untrained.model_copy(
        update={"learn": LearnConfig(mode="none", valid_scales=[0.5, 1.0, 0.5])}
    )
    server_merge(
        base,
        members,
        tiny().model,
        0,
        repeated,
        judge=lambda candidates: scored.append(len(candidates)) or [0.0] * len(candidates),
    )
    assert scored == [2]
    with pytest.raises(FedmergeError, match=r"valid_scales must be factors in \(0, 100\)"):
        LearnConfig(valid_scales=[0.0, 1.0])


def test_merge_rejects_bad_inputs_by_name(
    finetuned: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMERGE_DATA", str(finetuned["root"] / "cache"))
    root, base = finetuned["root"], finetuned["root"] / DOMAINS[0] / "base.safetensors"
    average = MergeConfig(method="average")
    with pytest.raises(FedmergeError, match="2 models for 3 domains"):
        merge_run(base, [root / d for d in DOMAINS[:2]], DOMAINS, average, tmp_path / "a")
    with pytest.raises(FedmergeError, match="listed twice"):
        merge_run(
            base, [root / d for d in DOMAINS[:2]], ["synth-0", "synth-0"], average, tmp_path / "b"
        )
    broken = tmp_path / "broken"
    broken.mkdir()
    weights = load_file(str(root / "synth-1" / "model.safetensors"))
    weights["positions"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((root / "synth-1" / "config.json").read_text())
    with pytest.raises(FedmergeError, match="NaN"):
        merge_run(base, [root / "synth-0", broken], DOMAINS[:2], average, tmp_path / "c")
    assert not (tmp_path / "c" / "metrics.json").exists()
    # the same seeded base built with another thread count differs by float noise (~1e-7): still the
    # same start
    noisy = {k: t + 1e-7 if t.is_floating_point() else t for k, t in load_file(str(base)).items()}
    save_file(noisy, str(tmp_path / "noisy.safetensors"))
    rows, _ = merge_run(
        tmp_path / "noisy.safetensors",
        [root / d for d in DOMAINS[:2]],
        DOMAINS[:2],
        average,
        tmp_path / "d",
    )
    assert {r["domain"] for r in rows} == set(DOMAINS[:2])


def test_merge_checks_each_model_domain_and_never_loses_a_finished_merge(
    finetuned: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMERGE_DATA", str(finetuned["root"] / "cache"))
    root, base = finetuned["root"], finetuned["root"] / DOMAINS[0] / "base.safetensors"
    models, average, out = (
        [root / d for d in DOMAINS[:2]],
        MergeConfig(method="average"),
        tmp_path / "merged",
    )
    with pytest.raises(FedmergeError, match="was trained on synth-0, not on synth-1"):
        merge_run(base, models, ["synth-1", "synth-0"], average, out)
    assert not out.exists() and not (tmp_path / "merged.partial").exists()
    merge_run(base, models, DOMAINS[:2], average, out, quiet=True)
    finished = {p.name: p.read_bytes() for p in out.iterdir()}
    # a merge is no member
    with pytest.raises(FedmergeError, match="trained on synth-0, synth-1, not on synth-0"):
        merge_run(base, [out, models[1]], DOMAINS[:2], average, tmp_path / "again")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the merge broke half-way")

    monkeypatch.setattr("fedmerge.merge.run.server_merge", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        merge_run(base, models, DOMAINS[:2], average, out, quiet=True)
    # the finished merge, byte for byte
    assert {p.name: p.read_bytes() for p in out.iterdir()} == finished
    assert not (tmp_path / "merged.partial").exists()  # and no half-written folder beside it
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "metrics.json").write_text("my own numbers")
    with pytest.raises(FedmergeError, match="not empty and was not written by fedmerge"):
        merge_run(base, models, DOMAINS[:2], average, foreign)
    assert (foreign / "metrics.json").read_text() == "my own numbers"
    with pytest.raises(FedmergeError, match="--models is empty"):
        merge_run(base, [], [], average, tmp_path / "none")


def test_merge_command(finetuned: dict, tmp_path: Path) -> None:
    root = finetuned["root"]
    common = [
        "--base",
        str(root / "synth-0" / "base.safetensors"),
        "--models",
        f"{root / 'synth-0'},{root / 'synth-1'}",
        "--domains",
        "synth-0,synth-1",
        "--quiet",
    ]
    out = run_cli(
        "merge",
        *common,
        "--method",
        "task_arithmetic",
        "--learn",
        "none",
        "--set",
        "method.lam=0.5",
        "--out",
        str(tmp_path / "m"),
        cache=root / "cache",
    )
    assert out.returncode == 0, out.stderr
    coefficients = json.loads((tmp_path / "m" / "coefficients.json").read_text())
    assert coefficients["weights"] == [[0.5], [0.5]] and coefficients["params"] == {"lam": 0.5}
    assert coefficients["rows"] == "usage"
    rows = run_cli(
        "merge", *common, "--rows", "sometimes", "--out", str(tmp_path / "r"), cache=root / "cache"
    )
    assert rows.returncode == 2 and "'rows'" in rows.stderr and "usage" in rows.stderr
    bad = run_cli(
        "merge",
        *common,
        "--set",
        "learn.stpes=3",
        "--out",
        str(tmp_path / "bad"),
        cache=root / "cache",
    )
    assert bad.returncode == 2 and "'learn.stpes' is not a known key" in bad.stderr
    other = run_cli(
        "merge",
        "--base",
        str(root / "synth-1" / "model.safetensors"),
        *common[2:],
        "--out",
        str(tmp_path / "o"),
        cache=root / "cache",
    )
    assert other.returncode == 2 and "fine-tuned from another base" in other.stderr
