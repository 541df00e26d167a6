"""Graders for notebooks 01-03 (why PEFT, LoRA by hand, LoRA fine-tuning)."""

import random
from collections.abc import Callable

from course.checks._grader import _Grader, _run


def check_full_finetuning_bytes(fn: Callable) -> None:
    """fn(n_params, weight_bytes) -> bytes of weights + gradients + AdamW states for full fine-tuning."""
    grader = _Grader("full_finetuning_bytes")
    rng = random.Random(1)
    cases = [(134_515_008, 4), (6_738_415_616, 2), (65_285_660_672, 2), (1, 1)]
    cases += [(rng.randint(1, 10**11), rng.choice([1, 2, 4])) for _ in range(8)]
    for n_params, weight_bytes in cases:
        got = _run(grader, fn, (n_params, weight_bytes), f"fn({n_params:,}, {weight_bytes})")
        want = n_params * (2 * weight_bytes + 8)
        grader.expect(
            isinstance(got, (int, float)) and abs(got - want) < 0.5,
            f"for {n_params:,} parameters at {weight_bytes} bytes each: expected {want:,} bytes, "
            f"got {got!r}. Hint: per parameter, the weight and its gradient (both weight_bytes) plus "
            "AdamW's two fp32 moments m and v (4 + 4 bytes), whatever the weights' dtype.",
        )
    grader.passed(len(cases))


def check_lora_training_bytes(fn: Callable) -> None:
    """fn(n_params, n_adapter, weight_bytes) -> weights + gradients + AdamW bytes of LoRA training.

    The frozen base (n_params at weight_bytes) has no gradients and no optimizer states; the
    n_adapter adapter parameters are fp32 (course.memory.ADAPTER_BYTES) with fp32 gradients and
    two fp32 Adam moments: 4 + 4 + 8 bytes each, whatever the base's dtype.
    """
    from course.memory import ADAPTER_BYTES, OPTIMIZER_BYTES

    grader = _Grader("lora_training_bytes")
    rng = random.Random(2)
    cases = [(134_515_008, 4_884_480, 4), (6_738_415_616, 39_976_960, 2), (1000, 10, 1)]
    cases += [
        (rng.randint(10**6, 10**11), rng.randint(10**3, 10**8), rng.choice([1, 2, 4])) for _ in range(9)
    ]
    for n_params, n_adapter, weight_bytes in cases:
        got = _run(
            grader,
            fn,
            (n_params, n_adapter, weight_bytes),
            f"fn({n_params:,}, {n_adapter:,}, {weight_bytes})",
        )
        want = n_params * weight_bytes + n_adapter * (2 * ADAPTER_BYTES + OPTIMIZER_BYTES["adamw"])
        grader.expect(
            isinstance(got, (int, float)) and abs(got - want) < 0.5,
            f"for a base of {n_params:,} parameters at {weight_bytes} bytes and {n_adapter:,} adapter "
            f"parameters: expected {want:,} bytes, got {got!r}. Hint: which parameters have a gradient and "
            "optimizer states? And in which dtype does the course keep the adapters, whatever the base's?",
        )
    grader.passed(len(cases))


def _lora_case(gen, batch: tuple, in_features: int, out_features: int, r: int):
    import torch

    x = torch.randn(*batch, in_features, generator=gen)  # (..., in)
    W = torch.randn(out_features, in_features, generator=gen) / in_features**0.5  # (out, in)
    b = torch.randn(out_features, generator=gen)  # (out,)
    A = torch.randn(r, in_features, generator=gen) / in_features**0.5  # (r, in)
    B = torch.randn(out_features, r, generator=gen)  # (out, r): "trained", not zero
    return x, W, b, A, B


def check_lora_forward(fn: Callable) -> None:
    """fn(x, W, b, A, B, alpha, r) -> x W^T + b + (alpha / r) x A^T B^T."""
    import torch

    grader = _Grader("lora_forward")
    gen = torch.Generator().manual_seed(2)
    # (batch dims, in, out, r): in != out and r < both, so a transposed matrix fails loudly
    shapes = [((3,), 8, 12, 2), ((2, 5), 16, 6, 4), ((1, 4), 32, 32, 8), ((7,), 10, 20, 1), ((3,), 12, 40, 3)]
    alphas = [4.0, 16.0, 2.0, 8.0, 1.0]
    for (batch, n_in, n_out, r), alpha in zip(shapes, alphas, strict=True):
        x, W, b, A, B = _lora_case(gen, batch, n_in, n_out, r)
        shapes_text = f"x {tuple(x.shape)}, W {tuple(W.shape)}, A {tuple(A.shape)}"
        call = f"lora_forward({shapes_text}, alpha={alpha}, r={r})"
        got = _run(grader, fn, (x.clone(), W.clone(), b.clone(), A.clone(), B.clone(), alpha, r), call)
        base, update = x @ W.T + b, (x @ A.T) @ B.T  # (..., out) and the unscaled LoRA term
        want = base + (alpha / r) * update
        grader.expect(
            isinstance(got, torch.Tensor) and got.shape == want.shape,
            f"{call}: expected a tensor of shape {tuple(want.shape)}, got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.",
        )

        def close(y, got=got):  # fp32 rounding of sums of up to 40 products: far below 1e-4
            return torch.allclose(got, y, atol=1e-4, rtol=1e-4)

        if not close(want):
            if close(base + update):
                hint = "the LoRA term is not scaled: multiply it by alpha / r."
            elif close(base + (r / alpha) * update):
                hint = "scaling is alpha / r, not r / alpha."
            elif close(x @ W.T + (alpha / r) * update):
                hint = "the base layer's bias b is missing."
            elif close(base):
                hint = "the output equals the base layer's: the LoRA term B A x is missing."
            else:
                hint = "compute x @ W.T + b + (alpha / r) * (x @ A.T) @ B.T; A is (r, in), B is (out, r)."
            grader.expect(False, f"{call}: wrong values. Hint: {hint}")
    grader.passed(len(shapes))


def check_lora_merge(fn: Callable) -> None:
    """fn(W, A, B, alpha, r) -> W + (alpha / r) B A: one matrix that does the work of base + adapter."""
    import torch

    grader = _Grader("lora_merge")
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 12, 2), (16, 6, 4), (32, 32, 8), (10, 20, 1)]
    for (n_in, n_out, r), alpha in zip(shapes, [4.0, 16.0, 2.0, 8.0], strict=True):
        x, W, _, A, B = _lora_case(gen, (5,), n_in, n_out, r)
        call = f"merge(W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, alpha={alpha}, r={r})"
        got = _run(grader, fn, (W.clone(), A.clone(), B.clone(), alpha, r), call)
        delta = B @ A  # (out, r) @ (r, in) -> (out, in)
        want = W + (alpha / r) * delta
        grader.expect(
            isinstance(got, torch.Tensor) and got.shape == W.shape,
            f"{call}: expected a matrix of W's shape {tuple(W.shape)}, got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}. "
            "Hint: B @ A is (out, r) @ (r, in) = (out, in).",
        )
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
            if torch.allclose(got, W + delta, atol=1e-5):
                hint = "the update is not scaled: W + (alpha / r) * B @ A."
            elif torch.allclose(got, W - (alpha / r) * delta, atol=1e-5):
                hint = "that subtracts the update (unmerge); merging adds it."
            else:
                hint = "W + (alpha / r) * B @ A."
            grader.expect(False, f"{call}: wrong values. Hint: {hint}")
        grader.expect(
            torch.allclose(x @ got.T, x @ W.T + (alpha / r) * (x @ A.T) @ B.T, atol=1e-4),
            f"{call}: the merged layer must give the same outputs as base + adapter.",
        )
    grader.passed(len(shapes))


def check_lora_parameter_count(fn: Callable) -> None:
    """fn(config, r, target_modules) -> trainable LoRA parameters of a Llama-style config."""
    from course.memory import LINEAR_NAMES, ModelConfig

    grader = _Grader("lora_parameter_count")
    rng = random.Random(4)
    smollm2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3)  # fmt: skip
    cases = [(smollm2, 16, ["q_proj", "v_proj"]), (smollm2, 8, list(LINEAR_NAMES))]
    for _ in range(10):
        heads = rng.choice([4, 8, 16])
        config = dict(
            hidden_size=heads * rng.choice([16, 32, 64]),
            intermediate_size=rng.choice([256, 688, 1024]),
            num_hidden_layers=rng.randint(1, 12),
            num_attention_heads=heads,
            num_key_value_heads=rng.choice([heads, heads // 4, 1]),
        )
        targets = rng.sample(LINEAR_NAMES, rng.randint(1, len(LINEAR_NAMES)))
        cases.append((config, rng.choice([1, 4, 8, 64]), targets))
    for config, r, targets in cases:
        call = f"fn({config}, r={r}, target_modules={targets})"
        got = _run(grader, fn, (dict(config), r, list(targets)), call)
        cfg = ModelConfig.from_any({"name": "exercise", "vocab_size": 1, **config})
        want = cfg.lora_parameters(r, targets)
        grader.expect(
            isinstance(got, int) and got == want,
            f"{call}: expected {want:,}, got {got!r}. Hint: each adapted layer adds A (r x in) and "
            "B (out x r), i.e. r * (in + out), in every one of num_hidden_layers layers. k_proj and "
            "v_proj output num_key_value_heads * head_dim features (grouped-query attention), "
            "head_dim = hidden_size / num_attention_heads; gate_proj and up_proj map hidden -> "
            "intermediate, down_proj back.",
        )
    grader.passed(len(cases))


def check_completion_labels(fn: Callable) -> None:
    """fn(prompt_ids, answer_ids, eos_id) -> (input_ids, labels): loss on the answer and its end only."""
    from course.data import IGNORE_INDEX

    grader = _Grader("completion_labels")
    rng = random.Random(5)
    cases = [([5, 6, 7], [8, 9], 2)]
    for _ in range(10):
        prompt = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 30))]
        answer = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 12))]
        cases.append((prompt, answer, rng.choice([2, 0])))
    for prompt, answer, eos in cases:
        call = f"fn({prompt[:6]}{'...' if len(prompt) > 6 else ''}, {answer}, eos_id={eos})"
        got = _run(grader, fn, (list(prompt), list(answer), eos), call)
        grader.expect(isinstance(got, tuple) and len(got) == 2, f"{call}: expected (input_ids, labels).")
        input_ids, labels = ([int(t) for t in seq] for seq in got)
        want_ids = prompt + answer + [eos]
        want_labels = [IGNORE_INDEX] * len(prompt) + answer + [eos]
        grader.expect(
            input_ids == want_ids,
            f"{call}: input_ids should be prompt + answer + [eos_id] = {want_ids}, got {input_ids}.",
        )
        if labels != want_labels:
            if labels == want_ids:
                hint = f"the prompt is not masked: its labels must be {IGNORE_INDEX}, so the loss skips them."
            elif labels[:-1] == want_labels[:-1]:
                hint = "keep eos_id as the last label: the model must learn to stop."
            elif len(labels) < len(want_labels) or labels[: len(prompt) - 1] == want_labels[1 : len(prompt)]:
                hint = "do not shift the labels: the model shifts them by one position itself."
            else:
                hint = f"labels are {IGNORE_INDEX} for each prompt token, then the answer and eos_id."
            grader.expect(False, f"{call}: expected labels {want_labels}, got {labels}. Hint: {hint}")
    grader.passed(len(cases))


def check_target_modules(fn: Callable) -> None:
    """fn(module_names, targets) -> the names LoRA wraps: equal to a target or ending in "." + target."""
    from course.lora import _matches

    grader = _Grader("target_modules")
    names = ["", "model", "model.embed_tokens"]
    for layer in range(12):
        prefix = f"model.layers.{layer}"
        names += [prefix, f"{prefix}.self_attn", f"{prefix}.mlp"]
        names += [f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{prefix}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    names += ["model.norm", "lm_head"]
    cases = [
        ["q_proj", "v_proj"],
        ["proj"],  # a name ending, but not after a dot: matches nothing
        ["attn"],
        ["lm_head"],
        ["layers.1.mlp.down_proj"],  # a dotted path: layer 1 only, not layer 11
        ["q_proj", "self_attn.q_proj"],  # two targets, one module: listed once
        ["mlp"],
        ["gate_proj", "up_proj", "down_proj", "o_proj"],
    ]
    for targets in cases:
        call = f"fn(names, {targets})"
        got = _run(grader, fn, (list(names), list(targets)), call)
        want = [name for name in names if name and _matches(name, targets)]
        grader.expect(isinstance(got, (list, tuple)), f"{call}: expected a list, got {type(got).__name__}.")
        grader.expect(
            len(set(got)) == len(got),
            f"{call}: some names appear twice; list each matching module once.",
        )
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        grader.expect(
            not extra and not missing,
            f"{call}: expected {len(want)} names, got {len(got)}; wrongly included {extra[:3]}, missing "
            f"{missing[:3]}. Hint: a name matches a target when it equals it or ends with '.' + target: "
            "'layers.1.mlp.down_proj' must not match 'model.layers.11.mlp.down_proj', and 'proj' "
            "matches no module (it is not a whole name part).",
        )
    grader.passed(len(cases))


RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def choose_rank(config, target_modules, budget_bytes):
    """The reference of check_choose_rank: the largest power-of-two r whose adapter training state fits."""
    from course.memory import ADAPTER_BYTES, OPTIMIZER_BYTES

    per_param = 2 * ADAPTER_BYTES + OPTIMIZER_BYTES["adamw"]  # fp32 weight + gradient + m + v
    fitting = [r for r in RANKS if config.lora_parameters(r, target_modules) * per_param <= budget_bytes]
    return (fitting[-1], 2 * fitting[-1]) if fitting else None


def check_choose_rank(fn: Callable) -> None:
    """fn(config, target_modules, budget_bytes) -> (r, alpha) or None, as `choose_rank`."""
    from course.memory import load_model_config

    grader = _Grader("choose_rank")
    rng = random.Random(3)
    smol, llama = load_model_config("smollm2-135m"), load_model_config("llama-2-7b")
    qv, every = ["q_proj", "v_proj"], "all-linear"
    cases = [
        (smol, every, 100 * 2**20),
        (smol, every, 16 * smol.lora_parameters(16, every)),  # exactly the state of r = 16: it fits
        (smol, every, 16 * smol.lora_parameters(16, every) - 1),  # one byte short
        (smol, qv, 2**20),
        (llama, every, 2**30),
        (llama, qv, 1000),  # not even r = 1 fits
    ]
    for _ in range(10):
        config, targets = (
            rng.choice([smol, llama]),
            rng.choice([qv, every, ["q_proj", "k_proj", "v_proj", "o_proj"]]),
        )
        cases.append(
            (config, targets, 16 * config.lora_parameters(rng.choice(RANKS), targets) + rng.randint(-5, 5))
        )
    for config, targets, budget in cases:
        got = _run(grader, fn, (config, targets, budget), f"fn({config.name}, {targets!r}, {budget:,})")
        want = choose_rank(config, targets, budget)
        grader.expect(
            got == want or (want is not None and isinstance(got, tuple) and tuple(got) == want),
            f"for {config.name}, targets {targets!r} and a budget of {budget:,} bytes: expected {want}, got "
            f"{got!r}. Hint: count what the optimizer step needs for each adapter parameter, not only the "
            "weight itself; a state exactly as large as the budget fits; alpha keeps alpha / r = 2.",
        )
    grader.passed(len(cases))
