import math
import types

import pytest
import torch

import course
from course import data, train


@pytest.fixture
def tiny():
    return course.models.tiny_model(seed=0)


def test_training_lowers_loss_and_reports(tiny, tokenizer):
    dataset = data.load_task("ticket_routing", "train").select(range(8))
    result = train.train(tiny, tokenizer, dataset, steps=12, lr=3e-3, batch_size=4, progress=False)
    assert len(result.losses) == 12 and result.steps == 12
    assert sum(result.losses[-3:]) / 3 < result.losses[0] * 0.8
    assert result.seconds > 0 and result.tokens_per_second > 0 and result.peak_memory_bytes >= 0
    assert not tiny.training


def _three_step_losses(tokenizer, dataset, seed: int, **kwargs) -> list[float]:
    """Losses of 3 steps (batch 4, lr 1e-3) on a fresh tiny model."""
    model = course.models.tiny_model(seed=seed)
    return train.train(
        model, tokenizer, dataset, steps=3, lr=1e-3, batch_size=4, progress=False, **kwargs
    ).losses


def test_same_seed_same_losses(tokenizer):
    dataset = data.load_task("ticket_routing", "train").select(range(12))
    runs = [_three_step_losses(tokenizer, dataset, seed=1) for _ in range(2)]
    assert runs[0] == runs[1]


def test_batches_cover_the_data_in_a_seeded_order():
    items = [{"i": i} for i in range(10)]
    batches = list(train._batches(items, batch_size=5, steps=2, seed=0))
    assert sorted(x["i"] for b in batches for x in b) == list(range(10))
    assert batches == list(train._batches(items, batch_size=5, steps=2, seed=0))


def test_train_refuses_a_frozen_model_and_bad_arguments(tiny, tokenizer):
    dataset = data.load_task("ticket_routing", "train").select(range(4))
    with pytest.raises(ValueError, match="positive"):
        train.train(tiny, tokenizer, dataset, steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="optimizer"):
        train.train(tiny, tokenizer, dataset, steps=1, lr=1e-3, optimizer="sgd")
    tiny.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train(tiny, tokenizer, dataset, steps=1, lr=1e-3)


def test_custom_optimizer_factory_is_used(tiny, tokenizer):
    dataset = data.load_task("ticket_routing", "train").select(range(4))
    made = []

    def sgd(params):
        made.append(torch.optim.SGD(params, lr=0.1))
        return made[-1]

    train.train(tiny, tokenizer, dataset, steps=1, lr=0.1, batch_size=2, optimizer=sgd, progress=False)
    assert len(made) == 1 and made[0].state_dict()["param_groups"][0]["lr"] == 0.0  # decayed to zero


def test_answer_loss_equals_the_full_loss_and_its_gradients(tiny, tokenizer):
    dataset = data.load_task("event_extraction", "train").select(range(4))  # prompts of different lengths
    batch = data.collate(
        [data.tokenize_for_training(tokenizer, ex) for ex in dataset], tokenizer.pad_token_id
    )
    losses, grads = [], []
    for loss_fn in (lambda: tiny(**batch).loss, lambda: train.answer_loss(tiny, batch)):
        tiny.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss)
        grads.append(torch.cat([p.grad.flatten() for p in tiny.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_answer_logits_only_trains_like_the_full_loss(tokenizer):
    dataset = data.load_task("ticket_routing", "train").select(range(8))
    runs = [
        _three_step_losses(tokenizer, dataset, seed=2, answer_logits_only=answer_only)
        for answer_only in (False, True)
    ]
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


class _Oracle(torch.nn.Module):
    """Predicts, at every position, the token that really comes next (its input shifted by one)."""

    def __init__(self, vocab_size: int, spoil: int | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so that the model has a device
        self.vocab_size, self.spoil = vocab_size, spoil

    def forward(self, input_ids, attention_mask):
        following = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))  # (B, T)
        logits = torch.nn.functional.one_hot(following, self.vocab_size).float()  # (B, T, V)
        if (
            self.spoil is not None
        ):  # one wrong answer token in batch row `spoil`, at its last labelled position
            t = int(attention_mask[self.spoil].sum()) - 2
            logits[self.spoil, t] = logits[self.spoil, t].roll(1)
        return types.SimpleNamespace(logits=logits)


def test_teacher_forced_exact_match_scores_each_answer_token(tokenizer):
    dataset = data.load_task("ticket_routing", "test").select(range(6))
    vocab = len(tokenizer)
    assert train.teacher_forced_exact_match(_Oracle(vocab), tokenizer, dataset, batch_size=4) == 1.0
    spoil_row_1 = _Oracle(vocab, spoil=1)  # row 1 of every batch the model sees
    assert train.teacher_forced_exact_match(spoil_row_1, tokenizer, dataset, batch_size=6) == pytest.approx(
        5 / 6
    )
    assert train.teacher_forced_exact_match(spoil_row_1, tokenizer, dataset, batch_size=4) == pytest.approx(
        4 / 6
    )
    # per example: rows 1 and 5 (row 1 of the second batch of 4) are the spoiled ones
    assert train.teacher_forced_hits(spoil_row_1, tokenizer, dataset, batch_size=4) == [1, 0, 1, 1, 1, 0]


def test_perplexity_is_exp_of_the_models_own_loss(tiny, tokenizer):
    dataset = data.load_task("event_extraction", "validation").select(range(1))
    batch = data.collate([data.tokenize_for_training(tokenizer, dataset[0])], tokenizer.pad_token_id)
    with torch.no_grad():
        loss = tiny(**batch).loss.item()
    assert math.isclose(train.perplexity(tiny, tokenizer, dataset), math.exp(loss), rel_tol=1e-5)


def test_evaluate_exact_match_generates_one_answer_per_example(tiny, tokenizer):
    dataset = data.load_task("ticket_routing", "test").select(range(5))
    result = train.evaluate_exact_match(tiny, tokenizer, dataset, batch_size=2, max_new_tokens=3)
    assert len(result.predictions) == 5 and result.references == list(dataset["output"])
    assert 0.0 <= result.exact_match <= 1.0
    assert tokenizer.padding_side == "right"  # restored after left-padded generation


def test_left_padding_does_not_change_greedy_answers(tiny, tokenizer):
    dataset = data.load_task("ticket_routing", "test").select(range(4))
    batched = train.generate_answers(tiny, tokenizer, dataset, batch_size=4, max_new_tokens=4)
    single = train.generate_answers(tiny, tokenizer, dataset, batch_size=1, max_new_tokens=4)
    assert batched == single


def test_measure_peak_sees_a_large_allocation():
    def allocate():
        x = torch.ones(50_000_000)  # 200 MB
        return float(x[-1])

    result, peak = course.memory.measure_peak(allocate)
    assert result == 1.0
    assert peak > 150e6


class _Interrupted(Exception):
    """Stands in for a kill: raised from inside a training step."""


def _adapted_tiny():
    model = course.models.tiny_model(seed=2)
    course.lora.add_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)  # dropout: the RNG state matters
    return model


class _InterruptedAdamW(torch.optim.AdamW):
    """AdamW that raises inside step `after_steps + 1`, after that step's backward pass."""

    def __init__(self, params, after_steps: int):
        super().__init__(params, lr=3e-3, weight_decay=0.0)  # as train(optimizer="adamw")
        self.after_steps, self.calls = after_steps, 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls > self.after_steps:
            raise _Interrupted
        return super().step(closure)


def test_interrupted_run_resumes_from_its_last_checkpoint_and_ends_identical(tokenizer, tmp_path):
    dataset = data.load_task("ticket_routing", "train").select(range(12))
    hyper = dict(steps=7, lr=3e-3, batch_size=4, seed=3, progress=False)

    torch.manual_seed(5)
    uninterrupted = _adapted_tiny()
    reference = train.train(uninterrupted, tokenizer, dataset, **hyper)

    torch.manual_seed(5)
    with pytest.raises(_Interrupted):  # killed in step 6, after the checkpoint of step 4
        train.train(
            _adapted_tiny(),
            tokenizer,
            dataset,
            optimizer=lambda params: _InterruptedAdamW(params, after_steps=5),
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            **hyper,
        )
    assert train.latest_checkpoint(tmp_path).name == "step-000004.pt"

    torch.manual_seed(99)  # a new process: another RNG state, another LoRA init; the checkpoint restores both
    resumed_model = _adapted_tiny()
    resumed = train.train(
        resumed_model, tokenizer, dataset, checkpoint_dir=tmp_path, checkpoint_every=2, **hyper
    )
    assert resumed.resumed_from == 4 and len(resumed.losses) == 7
    assert resumed.losses == reference.losses
    final, want = course.lora.lora_state_dict(resumed_model), course.lora.lora_state_dict(uninterrupted)
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)
    assert any(
        not torch.equal(w, torch.zeros_like(w)) for k, w in want.items() if "lora_B" in k
    )  # it trained
    assert [p.name for p in tmp_path.iterdir()] == ["step-000007.pt"]  # older checkpoints removed


def test_resume_ignores_a_half_written_checkpoint_and_refuses_other_settings(tokenizer, tmp_path):
    dataset = data.load_task("ticket_routing", "train").select(range(8))
    hyper = dict(steps=2, lr=3e-3, batch_size=4, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    train.train(_adapted_tiny(), tokenizer, dataset, **hyper)
    (tmp_path / "step-000009.pt.tmp").write_bytes(b"killed while saving")  # what a kill mid-save leaves
    assert train.latest_checkpoint(tmp_path).name == "step-000002.pt"
    again = train.train(
        _adapted_tiny(), tokenizer, dataset, **hyper
    )  # resumes at the end: nothing left to do
    assert again.resumed_from == 2 and len(again.losses) == 2
    with pytest.raises(ValueError, match="saved by a run with"):
        train.train(_adapted_tiny(), tokenizer, dataset, **{**hyper, "lr": 1e-3})
    other = course.models.tiny_model(seed=2)
    course.lora.add_lora(other, ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="other trainable parameters"):
        train.train(other, tokenizer, dataset, **hyper)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train.train(_adapted_tiny(), tokenizer, dataset, **{**hyper, "checkpoint_every": 0})


# --- resuming safely, with any optimizer (issue 13) ---------------------------------------------


class _InterruptedAdam8bit(course.optim.Adam8bit):
    """Adam8bit (8-bit states for tensors of >= 256 elements) that raises inside step `after_steps + 1`."""

    def __init__(self, params, after_steps: int | None = None):
        super().__init__(params, lr=3e-3, min_8bit_size=256)
        self.after_steps, self.calls = after_steps, 0

    def step(self, closure=None):
        self.calls += 1
        if self.after_steps is not None and self.calls > self.after_steps:
            raise _Interrupted
        return super().step(closure)


def test_resume_with_adam8bit_ends_identical_to_an_uninterrupted_run(tokenizer, tmp_path):
    dataset = data.load_task("ticket_routing", "train").select(range(12))
    hyper = dict(steps=6, lr=3e-3, batch_size=4, seed=3, progress=False)
    torch.manual_seed(5)
    uninterrupted = _adapted_tiny()
    reference = train.train(uninterrupted, tokenizer, dataset, optimizer=_InterruptedAdam8bit, **hyper)
    torch.manual_seed(5)
    with pytest.raises(_Interrupted):
        train.train(
            _adapted_tiny(),
            tokenizer,
            dataset,
            optimizer=lambda params: _InterruptedAdam8bit(params, after_steps=3),
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            **hyper,
        )
    saved = torch.load(train.latest_checkpoint(tmp_path), weights_only=True)["optimizer"]["state"]
    assert {s["m"].dtype for s in saved.values()} == {torch.uint8, torch.float32}  # both kinds of state
    torch.manual_seed(99)
    resumed_model = _adapted_tiny()
    resumed = train.train(
        resumed_model,
        tokenizer,
        dataset,
        optimizer=_InterruptedAdam8bit,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        **hyper,
    )
    assert resumed.resumed_from == 2 and resumed.losses == reference.losses
    final, want = course.lora.lora_state_dict(resumed_model), course.lora.lora_state_dict(uninterrupted)
    assert all(torch.equal(final[k], want[k]) for k in want)


def test_a_checkpoint_carrying_a_pickled_callable_is_refused(tokenizer, tmp_path):
    dataset = data.load_task("ticket_routing", "train").select(range(4))
    hyper = dict(steps=1, lr=3e-3, batch_size=4, progress=False, checkpoint_dir=tmp_path)
    train.train(_adapted_tiny(), tokenizer, dataset, **hyper)
    path = train.latest_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)  # what train writes loads under weights_only
    state["losses"] = print  # a callable: unpickling it would import and hand back any global
    torch.save(state, path)
    model = _adapted_tiny()
    before = course.lora.lora_state_dict(model)
    with pytest.raises(ValueError, match="refusing to load"):
        train.train(model, tokenizer, dataset, **{**hyper, "steps": 2})
    after = course.lora.lora_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=float("nan")), ValueError, "lr must be a finite"),
        (dict(lr=float("inf")), ValueError, "lr must be a finite"),
        (dict(steps="3"), TypeError, "steps must be an int"),
        (dict(batch_size=2.0), TypeError, "batch_size must be an int"),
    ],
)
def test_train_refuses_odd_arguments(tiny, tokenizer, kwargs, error, match):
    dataset = data.load_task("ticket_routing", "train").select(range(4))
    with pytest.raises(error, match=match):
        train.train(tiny, tokenizer, dataset, **{"steps": 1, "lr": 1e-3, **kwargs})
    with pytest.raises(ValueError, match="dataset is empty"):
        train.train(tiny, tokenizer, dataset.select([]), steps=1, lr=1e-3)


def test_loss_scaling_keeps_small_fp16_gradients_from_rounding_to_zero():
    frozen = torch.ones(4, 4, dtype=torch.float16)  # a frozen fp16 layer
    v = torch.nn.Parameter(torch.ones(4))  # what trains, in fp32

    def gradient(scale: float) -> torch.Tensor:
        v.grad = None
        y = (v.half() @ frozen).float()  # (4,) fp16 activations
        (y.sum() * 1e-8 * scale).backward()  # 1e-8 is below fp16's smallest subnormal (6e-8)
        return v.grad / scale

    assert torch.equal(gradient(1.0), torch.zeros(4))  # unscaled: the gradient rounds to zero
    torch.testing.assert_close(gradient(2.0**16), torch.full((4,), 4e-8), rtol=1e-2, atol=0)


def _fp16_base_with_lora():
    torch.manual_seed(4)
    model = course.models.tiny_model(seed=4).half()  # the frozen base computes in fp16
    course.lora.add_lora(model, "all-linear", r=4, alpha=8)  # adapters in fp32, as peft's
    return model


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradients it is asked to step with (after any unscaling)."""

    def __init__(self, params):
        super().__init__(params, lr=3e-3, weight_decay=0.0)
        self.seen = []

    def step(self, closure=None):
        self.seen.append(torch.cat([p.grad.reshape(-1) for g in self.param_groups for p in g["params"]]))
        return super().step(closure)


def _first_step_gradient(model, tokenizer, dataset) -> tuple[list[float], torch.Tensor]:
    """(losses of 6 steps, the gradient the optimizer stepped with first) of course.train on `model`."""
    made = []

    def recording(params):
        made.append(_RecordingAdamW(params))
        return made[-1]

    result = train.train(
        model, tokenizer, dataset, steps=6, lr=3e-3, batch_size=4, progress=False, optimizer=recording
    )
    return result.losses, made[0].seen[0]


def test_an_fp16_base_trains_with_loss_scaling_and_unscaled_gradients(tokenizer):
    dataset = data.load_task("ticket_routing", "train").select(range(8))
    half, full = _fp16_base_with_lora(), _fp16_base_with_lora().float()
    for model, scaled in ((half, True), (full, False)):
        params = [p for p in model.parameters() if p.requires_grad]
        assert train.grad_scaler(model, params).is_enabled() == scaled
    losses16, grad16 = _first_step_gradient(half, tokenizer, dataset)
    _, grad32 = _first_step_gradient(full, tokenizer, dataset)
    assert all(math.isfinite(x) for x in losses16) and losses16[-1] < losses16[0]
    # the optimizer sees the true gradient (unscaled), not 65,536 times it: fp16 rounding apart, the fp32 one
    assert (grad16 - grad32).norm() < 0.05 * grad32.norm()


def test_fp16_trainable_parameters_are_refused(tokenizer):
    model = course.models.tiny_model(seed=0).half()
    model.requires_grad_(True)
    dataset = data.load_task("ticket_routing", "train").select(range(4))
    with pytest.raises(ValueError, match="trainable parameters are fp16.*dtype=torch.float32"):
        train.train(model, tokenizer, dataset, steps=1, lr=1e-3, progress=False)
