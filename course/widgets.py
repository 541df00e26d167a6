"""Interactive widgets for the notebooks, each with a static fallback.

A widget needs a live frontend (JupyterLab, Notebook, Colab). When a notebook runs headless
(nbconvert, `pytest --nbval`, CI) a widget would render as nothing, and its random model id
would break nbval's comparison, so every widget here prints a static summary instead.
Widgets take plain tensors and dicts; the figures they draw come from `course.plots`.
"""

import os

from course.env import in_colab


def has_frontend() -> bool:
    """True in a kernel started by Jupyter Server (it sets JPY_SESSION_NAME) or in Colab.

    COURSE_WIDGETS=1 or COURSE_WIDGETS=0 forces widgets on or off (e.g. in VS Code).
    """
    forced = os.environ.get("COURSE_WIDGETS")
    if forced in ("0", "1"):
        return forced == "1"
    return in_colab() or "JPY_SESSION_NAME" in os.environ


# --- 01 / 02: memory and LoRA rank -----------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:9,.2f} GiB"


def memory_calculator(
    models: dict,
    *,
    model: str | None = None,
    method: str = "qlora",
    r: int = 16,
    batch_size: int = 1,
    seq_len: int = 512,
    optimizer: str = "adamw",
    weight_bytes: int = 2,
) -> None:
    """Training memory by component for full / LoRA / QLoRA, from `course.memory`.

    models[label] = a config (a shipped name, a dict or a ModelConfig). Controls: model,
    method, rank, batch size, sequence length, optimizer; the chart stacks weights,
    gradients, optimizer states and activations for the three methods, and the text gives
    the chosen method's breakdown. Static fallback: that text and chart for the defaults.
    """
    import matplotlib.pyplot as plt

    from course.memory import METHODS, OPTIMIZER_BYTES, estimate_training_memory
    from course.plots import memory_bars

    labels = list(models)
    model = model or labels[-1]

    def show(model, method, r, batch_size, seq_len, optimizer):
        kwargs = dict(
            r=r, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer, weight_bytes=weight_bytes
        )
        estimates = {m: estimate_training_memory(models[model], m, **kwargs) for m in METHODS}
        chosen = estimates[method]
        print(f"{model}, {method}, r={r}, batch {batch_size} x {seq_len} tokens, {optimizer}, "
              f"{8 * weight_bytes}-bit weights:")  # fmt: skip
        for component, n in chosen.items():
            print(f"  {component:12s}{_fmt_bytes(n)}")
        print(f"  {'total':12s}{_fmt_bytes(sum(chosen.values()))}")
        memory_bars(estimates, title=f"{model}: r={r}, batch {batch_size} x {seq_len}, {optimizer}")
        plt.show()

    if not has_frontend():
        show(model, method, r, batch_size, seq_len, optimizer)
        print("(static view; in JupyterLab or Colab this is an interactive calculator)")
        return
    import ipywidgets

    ipywidgets.interact(
        show,
        model=ipywidgets.Dropdown(options=labels, value=model, description="model"),
        method=ipywidgets.Dropdown(options=METHODS, value=method, description="method"),
        r=ipywidgets.SelectionSlider(
            options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=r, description="rank r"
        ),
        batch_size=ipywidgets.SelectionSlider(
            options=[1, 2, 4, 8, 16, 32], value=batch_size, description="batch"
        ),
        seq_len=ipywidgets.SelectionSlider(
            options=[128, 256, 512, 1024, 2048, 4096], value=seq_len, description="seq_len"
        ),
        optimizer=ipywidgets.Dropdown(
            options=list(OPTIMIZER_BYTES), value=optimizer, description="optimizer"
        ),
    )


def rank_explorer(
    singular_values, in_features: int, out_features: int, ranks=(1, 2, 4, 8, 16, 32, 64)
) -> None:
    """Rank r against LoRA's trainable parameters r * (in + out) and the best rank-r error.

    singular_values: of a weight update (descending), e.g. torch.linalg.svdvals(W_after - W_before).
    Static fallback: a table over `ranks`.
    """
    from course.plots import rank_r_error

    errors = rank_r_error(singular_values)
    full = in_features * out_features

    def line(r):
        n = r * (in_features + out_features)
        return (f"r={r:4d}: {n:9,} trainable ({n / full:7.2%} of {full:,}), "
                f"best rank-r error {errors[r - 1].item():6.1%}")  # fmt: skip

    if not has_frontend():
        for r in ranks:
            if r <= len(errors):
                print(line(r))
        print("(static table; in JupyterLab or Colab a slider picks r)")
        return
    import ipywidgets

    ipywidgets.interact(
        lambda r: print(line(r)),
        r=ipywidgets.IntSlider(value=8, min=1, max=len(singular_values), description="r"),
    )


# --- 04 / 05: quantization ----------------------------------------------------------------


def quant_error_explorer(errors: dict) -> None:
    """Pick a format and a block size; see the histogram of the quantization error.

    errors[(format, blocksize)] = tensor of (dequantized - original) values.
    Static fallback: one line per combination with its MSE and largest error.
    """
    formats = list(dict.fromkeys(f for f, _ in errors))
    blocksizes = sorted({b for _, b in errors})

    def summary(key):
        e = errors[key].float()
        return f"MSE {e.pow(2).mean().item():.3e}, max |error| {e.abs().max().item():.3e}"

    if not has_frontend():
        for key in errors:
            print(f"{key[0]:5s} blocksize {key[1]:5d}: {summary(key)}")
        print("(static summary; in JupyterLab or Colab this is an interactive histogram)")
        return
    import ipywidgets
    import matplotlib.pyplot as plt

    from course.plots import error_histogram

    def show(fmt, blocksize):
        key = (fmt, blocksize)
        error_histogram(errors[key], f"{fmt}, blocksize {blocksize}: {summary(key)}")
        plt.show()

    ipywidgets.interact(
        show,
        fmt=ipywidgets.Dropdown(options=formats, description="format"),
        blocksize=ipywidgets.SelectionSlider(
            options=blocksizes, value=64 if 64 in blocksizes else blocksizes[0], description="blocksize"
        ),
    )
