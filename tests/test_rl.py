"""distill/rl.py: rewards, advantages, elastic clip bounds and the surrogate against hand-computed
values; the rollout layout against a plain forward; a tiny RL run on the sample task whose held-out
reward rises, resumes exactly, and writes a loadable student."""

from __future__ import annotations

import json
import math

import pytest
import torch

from answerfirst.distill import rl

TANH1 = math.tanh(1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: one thread is several times faster than two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prompts(tiny_checkpoint):
    from transformers import AutoTokenizer

    from answerfirst.artifact import bind_format

    return bind_format(AutoTokenizer.from_pretrained(tiny_checkpoint), None, where="tiny")


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    from answerfirst.distill.sample import sample_pairs

    rows = sample_pairs(seed=0, n_queries=12, docs_per_query=6, heldout_fraction=0.25)
    path = tmp_path_factory.mktemp("rl-data") / "teacher.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def answer(prompts, text: str, stopped: bool = True) -> tuple[int, ...]:
    return prompts.encode_text(text) + (prompts.answer_end_ids[:1] if stopped else ())


# ------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------


def test_grade_reward_is_linear_in_grade_distance():
    values = (0.0, 1.0, 2.0, 3.0, 4.0)
    assert rl.grade_reward(4, 4, values) == 1.0
    assert rl.grade_reward(3, 4, values) == pytest.approx(0.75)
    assert rl.grade_reward(1, 3, values) == pytest.approx(0.5)
    assert rl.grade_reward(0, 4, values) == 0.0
    assert rl.grade_reward(0, 2, (0.0, 1.0, 3.0)) == 0.0  # distances use the grade values, not indices
    assert rl.grade_reward(1, 2, (0.0, 1.0, 3.0)) == pytest.approx(1 / 3)


def test_grade_phrases_come_from_the_rubric(prompts):
    assert rl.grade_phrases(prompts.format) == {4: "exact match", 3: "relevant", 2: "partial", 1: "marginal", 0: "irrelevant"}
    phrases = rl.grade_phrases(prompts.format)
    assert rl.mentioned_grades("Irrelevant: a hose is no charger.", prompts.format, phrases) == {0}
    assert rl.mentioned_grades("Relevant, but the size differs.", prompts.format, phrases) == {3}
    assert rl.mentioned_grades("Verdict: partial match, grade 2.", prompts.format, phrases) == {2}
    assert rl.mentioned_grades("Matches the brand and colour.", prompts.format, phrases) == set()


def test_explanation_checks_each_rule(prompts):
    query, doc = "red running shoes", "Lightweight red running shoes with a breathable mesh upper."

    def checks(text, grade=4, stopped=True, lo=4, hi=48):
        c = rl.Completion(grade, answer(prompts, text, stopped), stopped)
        return rl.explanation_checks(c, query, doc, prompts, lo, hi)

    good = checks("\nThe red running shoes with a mesh upper: an exact match.")
    assert good == {"well_formed": 1.0, "consistent": 1.0, "length": 1.0, "grounded": 1.0}
    assert rl.explanation_reward(good) == 1.0

    assert checks("\nThe red running shoes match.", stopped=False)["well_formed"] == 0.0  # cut off
    assert checks("The red running shoes match.")["well_formed"] == 0.0  # no newline after the grade
    assert checks("\n   ")["well_formed"] == 0.0  # no visible text
    assert checks("\nred shoes <|im_start|>user")["well_formed"] == 0.0  # a template marker

    assert checks("\nPartial: the running shoes are blue.", grade=4)["consistent"] == 0.0
    assert checks("\nPartial, not an exact match.", grade=4)["consistent"] == 0.5
    assert checks("\nPartial: the running shoes are blue.", grade=2)["consistent"] == 1.0

    n_tokens = len(prompts.encode_text("The red running shoes match."))
    assert checks("\nThe red running shoes match.", lo=n_tokens, hi=n_tokens)["length"] == 1.0
    assert checks("\nThe red running shoes match.", lo=1, hi=n_tokens - 1)["length"] == 0.0
    assert checks("\nThe red running shoes match.", lo=n_tokens + 1, hi=n_tokens + 5)["length"] == 0.0

    assert checks("\nA garden hose for the lawn.")["grounded"] == 0.0
    assert checks("\nRunning is what it is for.")["grounded"] == 1.0  # "running" is in both texts
    assert checks("\nBreathable, lightweight.")["grounded"] == 0.5  # document words only

    bad = checks("\nA garden hose, partial.", grade=4, stopped=False)
    assert rl.explanation_reward(bad) == pytest.approx((0.0 + 0.0 + 1.0 + 0.0) / 4)


# ------------------------------------------------------------------------------------------------
# Advantages and elastic trust regions
# ------------------------------------------------------------------------------------------------


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.2, 0.4, 0.6, 0.8]])
    adv = rl.group_advantages(rewards)
    std3 = math.sqrt(0.05)  # population std of 0.2, 0.4, 0.6, 0.8
    expected = torch.tensor(
        [
            [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6)],
            [0.0, 0.0, 0.0, 0.0],  # all-equal rewards: no signal
            [-0.3 / (std3 + 1e-6), -0.1 / (std3 + 1e-6), 0.1 / (std3 + 1e-6), 0.3 / (std3 + 1e-6)],
        ]
    )
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        rl.group_advantages(rewards, normalize_std=False), rewards - rewards.mean(1, keepdim=True)
    )


def test_group_of_one_has_zero_advantage():
    adv = rl.group_advantages(torch.tensor([[0.7], [0.1]]))
    assert torch.equal(adv, torch.zeros(2, 1))
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError, match="groups, group_size"):
        rl.group_advantages(torch.tensor([0.1, 0.2]))


def test_elastic_bounds_hand_values():
    adv = torch.tensor([[1.0, -1.0, 0.0]])
    low, high = rl.elastic_clip_bounds(adv, torch.tensor([0.25]), 0.2, 0.28, elastic_adv=1.0, elastic_var=0.5, sigma_ref=0.5)
    # reliability 0.25 / 0.5 = 0.5 -> variance factor 1 - 0.5 + 0.5 * 0.5 = 0.75
    factor = torch.tensor([[(1 + TANH1) * 0.75, (1 + TANH1) * 0.75, 0.75]])
    torch.testing.assert_close(low, 0.2 * factor)
    torch.testing.assert_close(high, 0.28 * factor)

    # a group with no reward spread gets the narrowest range; a spread >= sigma_ref the full one
    low, _ = rl.elastic_clip_bounds(torch.zeros(2, 2), torch.tensor([0.0, 0.9]), 0.2, 0.2, 1.0, 0.5, 0.5)
    torch.testing.assert_close(low, torch.tensor([[0.1, 0.1], [0.2, 0.2]]))

    # the lower bound never reaches 1, so the clipped ratio stays positive
    low, high = rl.elastic_clip_bounds(torch.tensor([[5.0]]), torch.tensor([0.5]), 0.9, 0.9, 1.0, 0.0, 0.5)
    assert float(low) == pytest.approx(0.95) and float(high) == pytest.approx(0.9 * (1 + math.tanh(5.0)))


def test_static_presets_give_constant_clip():
    adv = torch.randn(3, 4)
    for name, expect_high in (("grpo", 0.2), ("dapo", 0.28)):
        p = rl.PRESETS[name]
        low, high = rl.elastic_clip_bounds(
            adv, torch.rand(3), p["clip_low"], p["clip_high"], p["elastic_adv"], p["elastic_var"]
        )
        assert torch.allclose(low, torch.full_like(adv, 0.2)) and torch.allclose(high, torch.full_like(adv, expect_high))


# ------------------------------------------------------------------------------------------------
# The surrogate and the KL
# ------------------------------------------------------------------------------------------------


def test_clipped_surrogate_hand_values_and_gradient():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 0.5]])).requires_grad_(True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    eps = torch.full((1, 4), 0.2)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, clip = rl.clipped_surrogate(logp, old, adv, eps, eps, mask)
    # min(1.5, 1.2) + min(0.5, 0.8) + min(-1, -1) + min(-0.5, -0.8) = 1.2 + 0.5 - 1 - 0.8 = -0.1
    assert float(loss.detach()) == pytest.approx(0.1 / 4)
    assert float(clip) == pytest.approx(0.5)  # tokens 1 and 4 took the clipped branch
    loss.backward()
    # clipped tokens get no gradient; the others d/dlogp of -ρA/4 = -ρA/4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4, 1.0 / 4, 0.0]]))

    masked, _ = rl.clipped_surrogate(logp, old, adv, eps, eps, torch.tensor([[True, True, True, False]]))
    assert float(masked.detach()) == pytest.approx(-(1.2 + 0.5 - 1.0) / 3)

    # DAPO-style clip-higher: a wider upper bound lets the 1.5 ratio through
    wide, clip = rl.clipped_surrogate(logp, old, adv, eps, torch.full((1, 4), 0.6), mask)
    assert float(wide.detach()) == pytest.approx(-(1.5 + 0.5 - 1.0 - 0.8) / 4)
    assert float(clip) == pytest.approx(0.25)


def test_surrogate_with_empty_mask_is_zero_with_gradient_path():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, clip = rl.clipped_surrogate(logp, logp.detach(), torch.ones(2, 3), *(torch.full((2, 3), 0.2),) * 2,
                                      torch.zeros(2, 3, dtype=torch.bool))  # fmt: skip
    assert float(loss.detach()) == 0.0 and float(clip) == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_k3_kl_hand_value():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    # token 1: e^(ln .5) - ln .5 - 1 = 0.5 + 0.693147 - 1; token 2: 0
    value = rl.k3_kl(logp, ref, torch.tensor([[True, True]]))
    assert float(value) == pytest.approx((0.5 + math.log(2) - 1) / 2, rel=1e-6)
    assert float(rl.k3_kl(logp, ref, torch.tensor([[False, True]]))) == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------------
# Rollouts on the tiny model
# ------------------------------------------------------------------------------------------------


def test_rollout_logprobs_match_a_plain_forward_and_loss_adds_up(tiny_checkpoint, prompts):
    from transformers import AutoModelForCausalLM

    from answerfirst.distill.train import StudentHead

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    pairs = [
        rl.RLPair(q, d, tuple(prompts.prompt(q, d).input_ids), gold)
        for q, d, gold in (("red running shoes", "Red running shoes, mesh.", 4), ("wireless headphones", "A garden hose.", 0))
    ]
    generator = torch.Generator().manual_seed(0)
    groups = [rl.sample_group(model, p.prompt_ids, prompts, 3, 6, 1.0, generator) for p in pairs]
    assert all(len(g) == 3 and all(len(c.explanation_ids) <= 6 for c in g) for g in groups)
    grade_rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])
    expl_rewards = torch.tensor([[0.25, 0.75, 0.5], [1.0, 0.0, 1.0]])
    config = rl.RLConfig(student="s", data="d", out="o", kl_coef=0.1, sft_coef=0.5, explanation_weight=0.5,
                         max_explanation_tokens=4, max_new_tokens=6)  # fmt: skip
    batch = rl.build_rollout(pairs, groups, grade_rewards, expl_rewards, prompts, 0, config)

    torch.testing.assert_close(batch.grade_adv, rl.group_advantages(grade_rewards).reshape(-1))
    assert torch.equal(batch.grade_adv[3:], torch.zeros(3))  # the all-equal group
    assert batch.grade_mask[:, 0].all() and batch.grade_mask.sum() == 6
    assert batch.explanation_mask.sum() == sum(len(c.explanation_ids) for g in groups for c in g)

    head = StudentHead(model, prompts.grade_ids)
    with torch.no_grad():
        logp, grade_logits = rl.answer_logprobs(head, batch, temperature=0.7)
    # the same numbers from a full forward of each unpadded sequence
    for row, (pair, c) in enumerate((p, c) for p, g in zip(pairs, groups, strict=True) for c in g):
        seq = [*pair.prompt_ids, prompts.grade_ids[c.grade], *c.explanation_ids]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0] / 0.7  # (T, V)
        p = len(pair.prompt_ids)
        expected_grade = torch.log_softmax(logits[p - 1, list(prompts.grade_ids)], -1)[c.grade]
        torch.testing.assert_close(logp[row, 0], expected_grade, rtol=1e-4, atol=1e-4)
        for j, token in enumerate(c.explanation_ids):
            torch.testing.assert_close(logp[row, 1 + j], torch.log_softmax(logits[p + j], -1)[token], rtol=1e-4, atol=1e-4)
    assert grade_logits.shape == (6, len(prompts.grade_ids))

    # ratio 1 everywhere: each step's surrogate is minus its masked mean advantage
    batch.old_logp = logp
    batch.ref_logp = logp - 0.1
    sft = torch.tensor(2.0)
    total, parts = rl.rl_loss(logp, batch, config, sft)
    pg_grade = -float(batch.grade_adv.mean())
    expl_adv = batch.explanation_adv.unsqueeze(1).expand_as(logp)[batch.explanation_mask]
    pg_expl = -float(expl_adv.mean())
    kl = math.exp(-0.1) + 0.1 - 1
    assert parts["pg_grade"] == pytest.approx(pg_grade, abs=1e-6)
    assert parts["pg_explanation"] == pytest.approx(0.5 * pg_expl, abs=1e-6)
    assert parts["kl"] == pytest.approx(0.1 * kl, rel=1e-5)
    assert parts["sft"] == pytest.approx(1.0)
    assert float(total) == pytest.approx(pg_grade + 0.5 * pg_expl + 0.1 * kl + 1.0, rel=1e-5)
    assert parts["clip_fraction"] == 0.0 and parts["kl_ref"] == pytest.approx(kl, rel=1e-5)


def test_group_of_one_gives_no_policy_gradient(tiny_checkpoint, prompts):
    from transformers import AutoModelForCausalLM

    from answerfirst.distill.train import StudentHead

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    pair = rl.RLPair("red running shoes", "Red running shoes.", tuple(prompts.prompt("red running shoes", "Red running shoes.").input_ids), 4)
    group = rl.sample_group(model, pair.prompt_ids, prompts, 1, 5, 1.0, torch.Generator().manual_seed(1))
    config = rl.RLConfig(student="s", data="d", out="o", group_size=1, min_explanation_tokens=1, max_explanation_tokens=3, max_new_tokens=5)
    batch = rl.build_rollout([pair], [group], torch.tensor([[0.75]]), torch.tensor([[0.5]]), prompts, 0, config)
    assert float(batch.grade_adv.abs().sum() + batch.explanation_adv.abs().sum()) == 0.0
    # no reward spread: the narrowest trust region, 0.2 * (1 - 0.5)
    torch.testing.assert_close(batch.grade_eps[0], torch.tensor([0.1]))
    head = StudentHead(model, prompts.grade_ids)
    logp, _ = rl.answer_logprobs(head, batch, 1.0)
    batch.old_logp = logp.detach()
    loss, parts = rl.rl_loss(logp, batch, config, None)
    loss.backward()
    assert parts["pg_grade"] == 0.0 and parts["pg_explanation"] == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in model.parameters())

def test_config_errors_name_the_field():
    base = dict(student="s", data="d", out="o")
    for bad, field in (
        (dict(group_size=0), "group_size"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(elastic_var=1.5), "elastic_var"),
        (dict(temperature=0.0), "temperature"),
        (dict(max_new_tokens=10, max_explanation_tokens=48), "max_new_tokens"),
        (dict(min_explanation_tokens=50), "min_explanation_tokens"),
        (dict(grade_weight=0.0, explanation_weight=0.0), "grade_weight"),
        (dict(sft_coef=-1.0), "sft_coef"),
        (dict(eval_fraction=1.0), "eval_fraction"),
        (dict(threads=0), "threads"),
    ):
        with pytest.raises(ValueError, match=field):
            rl.RLConfig(**base, **bad)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

TINY_RUN = dict(
    group_size=4, prompts_per_step=4, policy_epochs=2, learning_rate=2e-3, max_new_tokens=10,
    min_explanation_tokens=2, max_explanation_tokens=8, max_doc_tokens=24, sft_batch_size=4,
    max_trace_tokens=24, eval_every=4, threads=1,
)  # fmt: skip


@pytest.mark.slow
def test_tiny_run_raises_heldout_reward_and_writes_a_loadable_student(tiny_checkpoint, sample_data, tmp_path):
    import answerfirst
    from answerfirst.artifact import Manifest

    out = tmp_path / "rl"
    config = rl.RLConfig(student=str(tiny_checkpoint), data=str(sample_data), out=str(out), steps=12, **TINY_RUN)
    rl.train(config)
    metrics = rl.read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(13))
    evals = [m for m in metrics if "heldout_reward" in m]
    assert [m["step"] for m in evals] == [0, 4, 8, 12]
    # the held-out (unseen queries) expected grade reward rises over the run
    assert evals[-1]["heldout_reward"] > evals[0]["heldout_reward"] + 0.03, [m["heldout_reward"] for m in evals]
    for key in ("reward_grade", "reward_explanation", "grade_entropy", "clip_fraction", "kl_ref", "sft", "pg_grade"):
        assert all(math.isfinite(m[key]) for m in metrics[1:]), key
    assert any(m["clip_fraction"] > 0 for m in metrics[1:])  # the second policy epoch moves ratios off 1
    for key in ("heldout_ndcg10_gold", "heldout_accuracy_gold", "heldout_entropy", "heldout_kl_ref"):
        assert math.isfinite(evals[-1][key]), key
    assert evals[0]["heldout_kl_ref"] == pytest.approx(0.0, abs=1e-9) and evals[-1]["heldout_kl_ref"] > 0

    manifest = Manifest.read(out)
    assert manifest.info["rl_config"]["steps"] == 12 and manifest.info["rl_metrics"]["step"] == 12
    assert manifest.source["model"] == str(tiny_checkpoint)
    assert not (out / "checkpoints").exists()
    # every weight moved, and the runtime scores with the refined student
    from safetensors.torch import load_file

    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before), [k for k in before if torch.equal(before[k], after[k])]
    score = answerfirst.load(out).score("red running shoes", ["Red running shoes with mesh."])[0]
    assert sum(score.probs) == pytest.approx(1.0)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tiny_checkpoint, sample_data, tmp_path):
    full = rl.RLConfig(student=str(tiny_checkpoint), data=str(sample_data), out=str(tmp_path / "a"), steps=4,
                       save_every=2, **{**TINY_RUN, "eval_every": 2})  # fmt: skip
    rl.train(full)

    class Interrupt(Exception):
        pass

    def crash_at_3(row):
        if row["step"] == 3:
            raise Interrupt

    cut = rl.RLConfig(**{**full.__dict__, "out": str(tmp_path / "b")})
    with pytest.raises(Interrupt):
        rl.train(cut, progress=crash_at_3)
    assert (tmp_path / "b" / "checkpoints").is_dir()
    with pytest.raises(ValueError, match="--resume"):
        rl.train(cut)
    with pytest.raises(ValueError, match="learning_rate"):
        rl.train(rl.RLConfig(**{**cut.__dict__, "learning_rate": 1e-4}), resume=True)
    rl.train(cut, resume=True)

    a, b = rl.read_metrics(tmp_path / "a"), rl.read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [0, 1, 2, 3, 4]
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    for ma, mb in zip(a, b, strict=True):
        assert drop(ma) == pytest.approx(drop(mb), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_cli_runs_a_preset_and_reports_bad_settings(tiny_checkpoint, sample_data, tmp_path, capsys):
    from answerfirst.artifact import Manifest
    from answerfirst.cli import main

    out = tmp_path / "grpo"
    args = ["rl", "--student", str(tiny_checkpoint), "--data", str(sample_data), "--out", str(out), "--preset", "grpo",
            "--steps", "1", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "10",
            "--max-explanation-tokens", "8", "--max-doc-tokens", "24", "--threads", "1", "--no-normalize-std"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "step 1/1" in printed and "heldout reward" in printed
    settings = Manifest.read(out).info["rl_config"]
    assert settings["sft_coef"] == 0.0 and settings["elastic_adv"] == 0.0 and settings["normalize_std"] is False

    assert main([*args[:5], "--out", str(tmp_path / "bad"), "--group-size", "0"]) == 2
    assert "group_size" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert main([*args[:3], "--data", str(missing), "--out", str(tmp_path / "bad2"), "--steps", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err



@pytest.mark.slow
def test_rl_killed_mid_checkpoint_write_resumes_exactly(tiny_checkpoint, sample_data, tmp_path):
    from kill import run_cli

    from answerfirst.artifact import Manifest

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY_RUN, "eval_every": 2}.items()]
    args = ["rl", "--student", tiny_checkpoint, "--data", sample_data, "--steps", "6", "--save-every", "2", *flags]
    full = run_cli([*args, "--out", tmp_path / "full"])
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_cli([*args, "--out", tmp_path / "cut"], kill_at="step-00000004")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004.partial"]

    refused = run_cli([*args, "--out", tmp_path / "cut", "--resume", "--sft-coef", "0.25"])
    assert refused.returncode == 2 and "sft_coef 0.5 -> 0.25" in refused.stderr and len(refused.stderr.splitlines()) == 1
    resumed = run_cli([*args, "--out", tmp_path / "cut", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    a, b = rl.read_metrics(tmp_path / "full"), rl.read_metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == list(range(7))
    for ma, mb in zip(a, b, strict=True):
        assert drop(mb) == pytest.approx(drop(ma), rel=1e-6, abs=1e-7)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)
    info = Manifest.read(tmp_path / "cut").info
    assert info["resumes"] == [{"step": 2, "config_changes": {}}]
    assert info["truncation"]["train"]["examples"] == a[0]["train_examples"] > 0


@pytest.mark.slow
def test_rl_resume_with_allowed_config_change_is_recorded(tiny_checkpoint, sample_data, tmp_path):
    from answerfirst.artifact import Manifest

    base = dict(student=str(tiny_checkpoint), data=str(sample_data), out=str(tmp_path / "rl"), steps=2, save_every=1,
                **{**TINY_RUN, "eval_every": 2})  # fmt: skip

    class Interrupt(Exception):
        pass

    def crash_at_2(row):
        if row["step"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        rl.train(rl.RLConfig(**base), progress=crash_at_2)
    saved = (tmp_path / "rl" / "rl_config.json").read_bytes()
    changed = rl.RLConfig(**{**base, "sft_coef": 0.25})
    with pytest.raises(ValueError, match=r"sft_coef 0\.5 -> 0\.25.*--allow-config-change"):
        rl.train(changed, resume=True)
    assert (tmp_path / "rl" / "rl_config.json").read_bytes() == saved
    rl.train(changed, resume=True, allow_config_change=True)
    info = Manifest.read(tmp_path / "rl").info
    assert info["resumes"] == [{"step": 1, "config_changes": {"sft_coef": [0.5, 0.25]}}]
    assert info["rl_config"]["sft_coef"] == 0.25
