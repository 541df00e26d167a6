"""The LoRA graders (notebooks 01-03) pass a correct answer and reject plausible wrong ones."""

import pytest

from course import checks
from course.data import IGNORE_INDEX

# --- 01: full fine-tuning memory ------------------------------------------------------------------


def test_full_finetuning_bytes_accepts_the_reference():
    checks.check_full_finetuning_bytes(lambda n, wb: n * (wb + wb + 4 + 4))


@pytest.mark.parametrize(
    "wrong",
    [
        lambda n, wb: n * (wb + 8),  # forgets the gradients
        lambda n, wb: n * (2 * wb + 4),  # one Adam moment instead of two
        lambda n, wb: n * 4 * wb,  # Adam moments in the weights' dtype
        lambda n, wb: n * wb,  # weights only (inference)
    ],
)
def test_full_finetuning_bytes_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="full_finetuning_bytes"):
        checks.check_full_finetuning_bytes(wrong)


# --- 02: LoRA forward, merge, parameter count -------------------------------------------------------


def test_lora_forward_accepts_the_reference():
    checks.check_lora_forward(lambda x, W, b, A, B, alpha, r: x @ W.T + b + (alpha / r) * (x @ A.T) @ B.T)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda x, W, b, A, B, alpha, r: x @ W.T + b + (x @ A.T) @ B.T, "not scaled"),
        (lambda x, W, b, A, B, alpha, r: x @ W.T + b + (r / alpha) * (x @ A.T) @ B.T, "not r / alpha"),
        (lambda x, W, b, A, B, alpha, r: x @ W.T + (alpha / r) * (x @ A.T) @ B.T, "bias"),
        (lambda x, W, b, A, B, alpha, r: x @ W.T + b, "missing"),
        (lambda x, W, b, A, B, alpha, r: x @ W.T + b + (alpha / r) * (x @ B) @ A, "raised RuntimeError"),
    ],
)
def test_lora_forward_rejects_wrong_answers_with_a_hint(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_lora_forward(wrong)


def test_lora_merge_accepts_the_reference():
    checks.check_lora_merge(lambda W, A, B, alpha, r: W + (alpha / r) * B @ A)


def _merge_in_place(W, A, B, alpha, r):
    W += (alpha / r) * B @ A  # modifying the argument is fine: the grader passes a copy
    return W


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda W, A, B, alpha, r: W + B @ A, "not scaled"),
        (lambda W, A, B, alpha, r: W - (alpha / r) * B @ A, "unmerge"),
        (lambda W, A, B, alpha, r: (alpha / r) * B @ A, "wrong values"),  # the update alone
        (lambda W, A, B, alpha, r: W + (alpha / r) * A.T @ B.T, "raised RuntimeError|shape"),
    ],
)
def test_lora_merge_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_lora_merge(wrong)


def test_lora_merge_accepts_an_in_place_answer():
    checks.check_lora_merge(_merge_in_place)


def _lora_count(config, r, targets, *, gqa=True, per_layer=True):
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"] if gqa else h
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    one_layer = sum(r * (a + b) for name, (a, b) in shapes.items() if name in targets)
    return one_layer * (config["num_hidden_layers"] if per_layer else 1)


def test_lora_parameter_count_accepts_the_reference():
    checks.check_lora_parameter_count(_lora_count)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda c, r, t: _lora_count(c, r, t, gqa=False),  # forgets grouped-query attention
        lambda c, r, t: _lora_count(c, r, t, per_layer=False),  # one layer only
        lambda c, r, t: _lora_count(c, r, t) // r * r * r,  # r^2 (in + out): squares the rank
    ],
)
def test_lora_parameter_count_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="lora_parameter_count"):
        checks.check_lora_parameter_count(wrong)


# --- 03: labels and targets -------------------------------------------------------------------------


def test_completion_labels_accepts_the_reference():
    checks.check_completion_labels(lambda p, a, eos: (p + a + [eos], [IGNORE_INDEX] * len(p) + a + [eos]))


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda p, a, eos: (p + a + [eos], p + a + [eos]), "not masked"),
        (lambda p, a, eos: (p + a + [eos], [IGNORE_INDEX] * len(p) + a + [IGNORE_INDEX]), "learn to stop"),
        (lambda p, a, eos: (p + a + [eos], [IGNORE_INDEX] * (len(p) - 1) + a + [eos]), "shift"),
        (lambda p, a, eos: (p + a, [IGNORE_INDEX] * len(p) + a), "input_ids should be"),
        (lambda p, a, eos: (p + a + [eos], [0] * len(p) + a + [eos]), "expected labels"),
    ],
)
def test_completion_labels_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_completion_labels(wrong)


def test_target_modules_accepts_the_reference():
    checks.check_target_modules(
        lambda names, targets: [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    )


@pytest.mark.parametrize(
    "wrong",
    [
        lambda names, targets: [n for n in names if any(t in n for t in targets)],  # substring
        lambda names, targets: [n for n in names if any(n.endswith(t) for t in targets)],  # no dot
        lambda names, targets: [n for t in targets for n in names if n == t or n.endswith("." + t)],  # twice
        lambda names, targets: [n for n in names if n.split(".")[-1] in targets],  # last part only
    ],
)
def test_target_modules_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="target_modules"):
        checks.check_target_modules(wrong)


def test_a_stub_fails_with_the_reminder():
    def stub(*args):
        raise NotImplementedError("Your turn")

    for grader in (checks.check_lora_forward, checks.check_lora_merge, checks.check_target_modules):
        with pytest.raises(AssertionError, match="not implemented yet"):
            grader(stub)


# --- 01: LoRA training memory ---------------------------------------------------------------------


def test_lora_training_bytes_accepts_the_reference():
    checks.check_lora_training_bytes(lambda n, na, wb: n * wb + na * (4 + 4 + 8))


@pytest.mark.parametrize(
    "wrong",
    [
        lambda n, na, wb: n * wb + na * (wb + wb + 8),  # adapters in the base's dtype
        lambda n, na, wb: n * (2 * wb + 8) + na * 16,  # gradients and states for the frozen base too
        lambda n, na, wb: n * wb + na * (4 + 8),  # forgets the adapters' gradients
        lambda n, na, wb: (n + na) * wb,  # weights only
    ],
)
def test_lora_training_bytes_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="lora_training_bytes"):
        checks.check_lora_training_bytes(wrong)


# --- 03: choosing r under a memory budget ----------------------------------------------------------

from course.checks.lora import RANKS, choose_rank  # noqa: E402


def test_choose_rank_accepts_the_reference():
    checks.check_choose_rank(choose_rank)


def _rank_weights_only(config, targets, budget):  # counts the fp32 adapter weights, not their state
    fitting = [r for r in RANKS if config.lora_parameters(r, targets) * 4 <= budget]
    return (fitting[-1], 2 * fitting[-1]) if fitting else None


def _rank_strict(config, targets, budget):  # a state exactly as large as the budget is refused
    fitting = [r for r in RANKS if config.lora_parameters(r, targets) * 16 < budget]
    return (fitting[-1], 2 * fitting[-1]) if fitting else None


def _rank_fixed_alpha(config, targets, budget):  # alpha stays 16 whatever r
    got = choose_rank(config, targets, budget)
    return None if got is None else (got[0], 16)


def _rank_never_none(config, targets, budget):  # falls back to r = 1 when nothing fits
    return choose_rank(config, targets, budget) or (1, 2)


@pytest.mark.parametrize("wrong", [_rank_weights_only, _rank_strict, _rank_fixed_alpha, _rank_never_none])
def test_choose_rank_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="choose_rank"):
        checks.check_choose_rank(wrong)
