"""Graders for notebook 11 (the other PEFT families): prefix tuning's parameter count under GQA, IA3's merge."""

from collections.abc import Callable

from course.checks._grader import _Grader, _run


def prefix_parameter_count(n, layers, heads, kv_heads, head_dim, projection, hidden) -> int:
    """The reference: peft's PrefixEncoder on a GQA decoder (the prefix holds kv_heads, not heads)."""
    kv_dim = kv_heads * head_dim
    out = layers * 2 * kv_dim  # keys and values of every layer
    if not projection:
        return n * out
    return n * kv_dim + (kv_dim * hidden + hidden) + (hidden * out + out)  # embedding, Linear, Linear


def check_prefix_parameter_count(fn: Callable) -> None:
    """fn(n, layers, heads, kv_heads, head_dim, projection, hidden) -> trainable parameters of prefix tuning."""
    grader = _Grader("prefix_parameter_count")
    cases = [  # (n, layers, heads, kv_heads, head_dim, projection, hidden)
        (20, 30, 9, 3, 64, False, 192),  # SmolLM2-135M
        (20, 30, 9, 3, 64, True, 192),
        (10, 2, 4, 2, 16, False, 32),  # course.models.tiny_model()
        (10, 2, 4, 2, 16, True, 32),
        (8, 32, 32, 8, 128, True, 512),  # a Llama-3-8B-like GQA model, a wider MLP
        (4, 12, 12, 12, 64, True, 768),  # no GQA (GPT-2 small)
    ]
    for case in cases:
        n, layers, heads, kv_heads, head_dim, projection, hidden = case
        call = f"fn{case}"
        got = _run(grader, fn, case, call)
        want = prefix_parameter_count(*case)
        if got == want:
            continue
        as_query_heads = prefix_parameter_count(n, layers, heads, heads, head_dim, projection, hidden)
        only_keys = (
            n * layers * kv_heads * head_dim
            if not projection
            else prefix_parameter_count(n, layers, heads, kv_heads, head_dim, True, hidden)
            - (hidden + 1) * layers * kv_heads * head_dim
        )
        kv_dim = kv_heads * head_dim
        no_bias = want - hidden - layers * 2 * kv_dim
        if got == as_query_heads:
            hint = (
                f"that counts {heads} query heads. The prefix lives in the KV cache, which holds the "
                f"{kv_heads} key/value heads before they are shared among the query groups."
            )
        elif got == only_keys:
            hint = "every layer gets a key prefix *and* a value prefix: a factor 2."
        elif projection and got == no_bias:
            hint = "both Linear layers of the MLP have a bias (hidden, and layers * 2 * kv_dim numbers)."
        elif projection and got == n * layers * 2 * kv_dim:
            hint = "with prefix_projection the trainable part is the small embedding plus the MLP, not the prefix."
        else:
            hint = "one virtual token holds layers * 2 * kv_heads * head_dim numbers; add the MLP when projecting."
        grader.expect(False, f"{call}: expected {want:,}, got {got!r}. Hint: {hint}")
    grader.passed(len(cases))


def check_ia3_merge(fn: Callable) -> None:
    """fn(weight (out, in), l, feedforward) -> the merged weight: columns scaled (feed-forward) or rows (k, v)."""
    import torch

    grader = _Grader("ia3_merge")
    gen = torch.Generator().manual_seed(11)
    cases = [
        ((4, 4), True),
        ((4, 4), False),
        ((2, 3), True),
        ((2, 3), False),
        ((5, 7), True),
        ((7, 5), False),
    ]
    for (out_f, in_f), feedforward in cases:
        weight = torch.randn(out_f, in_f, generator=gen)
        l = 1 + torch.rand(in_f if feedforward else out_f, generator=gen)  # noqa: E741 (the paper's name)
        call = f"fn(weight {(out_f, in_f)}, l {tuple(l.shape)}, feedforward={feedforward})"
        got = _run(grader, fn, (weight.clone(), l.clone(), feedforward), call)
        want = weight * l[None, :] if feedforward else weight * l[:, None]
        grader.expect(
            isinstance(got, torch.Tensor) and got.shape == weight.shape,
            f"{call}: expected a tensor of the weight's shape {(out_f, in_f)}, got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}. Hint: an elementwise "
            "multiply keeps the shape; l must be broadcast along the right axis.",
        )
        if torch.allclose(got, want, atol=1e-6):
            continue
        if out_f == in_f and torch.allclose(got, weight * l[:, None] if feedforward else weight * l[None, :]):
            hint = (
                "the right numbers on the wrong axis. W (l * x) scales W's columns (one per input feature); "
                "l * (W x) scales its rows (one per output feature)."
            )
        elif torch.allclose(got, weight / (l[None, :] if feedforward else l[:, None])):
            hint = "merging multiplies by l; dividing is unmerging."
        elif torch.allclose(got, weight + (l[None, :] if feedforward else l[:, None])):
            hint = "IA3 rescales: multiply, do not add."
        else:
            hint = "feed-forward: W * l[None, :]; keys and values: W * l[:, None]."
        grader.expect(False, f"{call}: wrong values. Hint: {hint}")
    grader.passed(len(cases))
