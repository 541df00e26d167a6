"""Figures for the notebooks.

Each function takes plain tensors and dicts (never a model) and returns a small matplotlib
Figure (dpi <= 100), so notebooks stay short and tests can call the functions directly.
"""


# --- 01 / 02 / 03: memory and LoRA ----------------------------------------------------------


def memory_bars(estimates: dict, unit: float = 2**30, unit_name: str = "GiB", title: str = "", ax=None):
    """estimates[label][component] = bytes -> one stacked bar per label (weights, gradients, ...)."""
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3), dpi=80)
    labels = list(estimates)
    components = list(dict.fromkeys(c for parts in estimates.values() for c in parts))
    bottom = [0.0] * len(labels)
    for i, component in enumerate(components):
        heights = [estimates[label].get(component, 0) / unit for label in labels]
        ax.bar(labels, heights, bottom=bottom, color=f"C{i}", label=component)
        bottom = [a + b for a, b in zip(bottom, heights, strict=True)]
    for x, total in enumerate(bottom):
        ax.text(
            x,
            total,
            f"{total:,.0f}" if total >= 100 else f"{total:,.1f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel(unit_name)
    ax.set_ylim(0, max(bottom) * 1.15)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if fig is not None:
        fig.tight_layout()
    return ax.figure


def rank_spectrum(singular_values: dict):
    """singular_values[label] = 1-D tensor (descending) -> the spectrum and the best rank-r error.

    Left: s_i / s_1. Right: the relative error of the best rank-r approximation (Eckart-Young),
    ||M - M_r||_F / ||M||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2), against r.
    """
    import matplotlib.pyplot as plt
    import torch

    fig, axes = plt.subplots(1, 2, figsize=(9, 3), dpi=80)
    for i, (label, s) in enumerate(singular_values.items()):
        s = s.double()
        ranks = torch.arange(1, len(s) + 1)
        axes[0].plot(ranks, s / s[0], color=f"C{i}", label=label)
        axes[1].plot(ranks, rank_r_error(s), color=f"C{i}", label=label)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("index i")
    axes[0].set_ylabel("s_i / s_1")
    axes[0].set_title("singular values", fontsize=9)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("rank r")
    axes[1].set_ylabel("relative error")
    axes[1].set_title("best rank-r approximation", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rank_r_error(singular_values):
    """error[r - 1] = ||M - M_r||_F / ||M||_F for r = 1..n, from M's singular values."""
    import torch

    energy = singular_values.double().pow(2)
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i] = sum_{j >= i} s_j^2
    return torch.cat([tail[1:], tail.new_zeros(1)]).div(energy.sum()).sqrt()


def loss_curves(curves: dict, title: str = "", ax=None):
    """curves[label] = list of losses, one per step -> overlaid lines (later ones dashed)."""
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    for i, (label, losses) in enumerate(curves.items()):
        style = "-" if i == 0 else "--"
        ax.plot(range(1, len(losses) + 1), losses, style, color=f"C{i}", label=label, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if fig is not None:
        fig.tight_layout()
    return ax.figure


def tenancy_costs(tenants: list, costs: dict, unit_name: str = "GB"):
    """costs[label] = one value per entry of `tenants` -> lines of cost against the number of tenants."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3), dpi=80)
    for label, values in costs.items():
        ax.plot(tenants, values, "o-", label=label, ms=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("customers (one fine-tuned model each)")
    ax.set_ylabel(unit_name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- 04 / 05: quantization ----------------------------------------------------------------


def codes_on_normal(codes: dict, sigma: float):
    """Each codebook (values in [-1, 1]) as stems on the normal density N(0, sigma^2).

    sigma is the spread that a block of normal weights has after dividing by its absmax;
    NF4 assumes absmax = Phi^-1(0.9677) sigma, i.e. sigma = 1 / 1.848.
    """
    import math

    import matplotlib.pyplot as plt
    import torch

    x = torch.linspace(-1.05, 1.05, 400)
    density = torch.exp(-0.5 * (x / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    fig, axes = plt.subplots(len(codes), 1, figsize=(7, 1.6 * len(codes)), dpi=80, sharex=True)
    for ax, (name, code) in zip(axes, codes.items(), strict=True):
        ax.plot(x, density, color="0.6", lw=1)
        values = code.unique()  # sorted, duplicates (INT4's -0/+0) once
        ax.vlines(values, 0, density.max() * 1.05, color="C0", lw=1)
        ax.plot(values, torch.zeros_like(values), "o", color="C0", ms=3)
        bounds = (values[:-1] + values[1:]) / 2
        ax.vlines(bounds, 0, density.max() * 0.25, color="C3", lw=0.8, linestyles=":")
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
        ax.set_yticks([])
    axes[-1].set_xlabel("value / absmax  (blue: code values, red dotted: decision boundaries)")
    fig.tight_layout()
    return fig


def weight_histogram(weights, title: str):
    """Histogram of standardized weights against the N(0, 1) density, linear and log scale."""
    import math

    import matplotlib.pyplot as plt
    import torch

    z = ((weights - weights.mean()) / weights.std()).reshape(-1)
    grid = torch.linspace(-6, 6, 300)
    normal = torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), dpi=80)
    for ax, log in zip(axes, (False, True), strict=True):
        ax.hist(z.clamp(-6, 6), bins=240, density=True, color="C0", alpha=0.7, label="weights")
        ax.plot(grid, normal, color="C3", lw=1, label="N(0, 1)")
        ax.set_xlabel("(w - mean) / std")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(1e-5, 1)
    axes[0].legend(fontsize=8)
    axes[0].set_title(title, fontsize=9)
    axes[1].set_title("same, log scale: the tails", fontsize=9)
    fig.tight_layout()
    return fig


def error_vs_blocksize(mse: dict):
    """mse[format][blocksize] -> a line per format, MSE against block size (log-log)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=80)
    for name, by_blocksize in mse.items():
        sizes = sorted(by_blocksize)
        ax.plot(sizes, [by_blocksize[s] for s in sizes], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("blocksize")
    ax.set_ylabel("mean squared error")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def error_histogram(errors, title: str, ax=None):
    """Histogram of quantization errors (dequantized - original), log count."""
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3), dpi=80)
    ax.hist(errors.reshape(-1), bins=120, color="C0")
    ax.set_yscale("log")
    ax.set_xlabel("dequantized - original")
    ax.set_title(title, fontsize=9)
    if fig is not None:
        fig.tight_layout()
    return fig if fig is not None else ax.figure


def dynamic_code_and_values(code, values):
    """The 256 values of the dynamic 8-bit code beside the values to be quantized (both scaled to [-1, 1])."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), dpi=80)
    axes[0].plot(code, ".", ms=2)
    axes[0].set_xlabel("index")
    axes[0].set_ylabel("code value")
    axes[0].set_title("signed dynamic map: dense near 0, 256 values", fontsize=9)
    axes[1].hist(values.reshape(-1), bins=100, color="C1")
    axes[1].set_xlabel("(absmax - offset) / absmax2")
    axes[1].set_title("what double quantization feeds it", fontsize=9)
    fig.tight_layout()
    return fig


def storage_breakdown(bits: dict):
    """bits[label][component] = bits per parameter -> stacked horizontal bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(bits)), dpi=80)
    components = list(dict.fromkeys(c for parts in bits.values() for c in parts))
    labels = list(bits)
    left = [0.0] * len(labels)
    for i, component in enumerate(components):
        widths = [bits[label].get(component, 0.0) for label in labels]
        ax.barh(labels, widths, left=left, color=f"C{i}", label=component)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, total in enumerate(left):  # the axis starts at 0, so the constants show at their true size
        ax.text(total + 0.05, y, f"{total:.3f}", va="center", fontsize=8)
    ax.set_xlabel("bits per parameter")
    ax.set_xlim(0, max(left) * 1.15)
    ax.legend(fontsize=8, ncol=len(components), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return fig


# --- 13: your own task ------------------------------------------------------------------------


def train_val_curves(curves: dict, best_step: int | None = None, title: str = "", ax=None):
    """curves[label] = (steps, losses) -> lines on one axis; a dotted line at the chosen checkpoint."""
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    for i, (label, (steps, losses)) in enumerate(curves.items()):
        ax.plot(steps, losses, "-" if i == 0 else "o-", color=f"C{i}", label=label, lw=1.5, ms=3)
    if best_step is not None:
        ax.axvline(best_step, color="gray", ls=":", label=f"kept: step {best_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if fig is not None:
        fig.tight_layout()
    return ax.figure


def sweep_panels(report: dict):
    """benchmarks/sweep.py's report -> validation loss vs learning rate per rank, the overfitting
    run, and general-text perplexity before/after each method."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3), dpi=80)
    grid = [run for run in report["runs"] if run["part"] == "lr_rank"]
    for i, r in enumerate(sorted({run["r"] for run in grid})):
        points = sorted((run["lr"], run["loss"]) for run in grid if run["r"] == r)
        axes[0].plot(*zip(*points, strict=True), "o-", color=f"C{i}", label=f"r={r}, alpha=r")
    for marker, run in zip("sv^D", [run for run in report["runs"] if run["part"] != "lr_rank"], strict=False):
        label = f"alpha={run['alpha']}" if run["part"] == "alpha" else f"targets {run['targets']}"
        axes[0].plot(run["lr"], run["loss"], marker, color="gray", label=f"r=16, {label}")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("learning rate")
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=7)
    overfit = report["overfit"]
    train = overfit["train_losses"]
    train_val_curves(
        {
            "train": (list(range(1, len(train) + 1)), train),
            "validation": tuple(zip(*overfit["curve"], strict=True)),
        },
        best_step=min(overfit["curve"], key=lambda point: point[1])[0],
        title=f"{overfit['examples']} training examples, lr {overfit['lr']:.0e}",
        ax=axes[1],
    )
    axes[1].set_yscale("log")
    methods = list(report["forgetting"])
    values = [report["forgetting"][m]["perplexity"] for m in methods]
    axes[2].bar(methods, values, color=[f"C{i}" for i in range(len(methods))])
    for x, value in enumerate(values):
        axes[2].text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    axes[2].set_ylabel("general-text perplexity")
    axes[2].set_ylim(0, max(values) * 1.2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --- 10: serving many tenants ---------------------------------------------------------------


def latency_vs_adapters(adapters: list, latency_ms: list, references: dict, spread_ms: list | None = None):
    """Latency of a mixed batch against the number of distinct adapters in it, beside reference lines.

    adapters: x values (distinct adapters in the batch); latency_ms: one per x; references[label] = ms
    (e.g. the base model, the merged model) drawn as horizontal lines; spread_ms: optional error bars.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3), dpi=80)
    ax.errorbar(adapters, latency_ms, yerr=spread_ms, fmt="o-", ms=4, capsize=3, label="mixed batch")
    for i, (label, ms) in enumerate(references.items()):
        ax.axhline(ms, color=f"C{i + 1}", ls="--", lw=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(adapters, [str(a) for a in adapters])
    ax.set_ylim(0, max([*latency_ms, *references.values()]) * 1.25)
    ax.set_xlabel("distinct adapters in one batch of 8 rows")
    ax.set_ylabel("forward pass (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# --- 12: scaling out ---------------------------------------------------------------------------


def time_breakdown(parts: dict, unit_name: str = "seconds per step", title: str = ""):
    """parts[label][phase] = seconds -> one horizontal stacked bar per label (e.g. compute, all-reduce)."""
    import matplotlib.pyplot as plt

    labels = list(parts)
    phases = list(dict.fromkeys(p for row in parts.values() for p in row))
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(labels)), dpi=80)
    left = [0.0] * len(labels)
    for i, phase in enumerate(phases):
        widths = [parts[label].get(phase, 0.0) for label in labels]
        ax.barh(labels, widths, left=left, color=f"C{i}", label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel(unit_name)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig
