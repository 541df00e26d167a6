"""The grader pattern every `check_<exercise>` shares."""

from collections.abc import Callable


class NotCallable(TypeError):
    """A grader was given something other than a function: a usage error, not a wrong answer."""


class _Grader:
    """Context for one grader: turns NotImplementedError and mismatches into clear failures."""

    def __init__(self, exercise: str):
        self.exercise = exercise

    def call(self, fn: Callable, *args):
        if not callable(fn):
            raise NotCallable(
                f"{self.exercise}: expected your function (the name defined in the cell above, without calling it), "
                f"got a {type(fn).__name__}."
            )
        try:
            return fn(*args)
        except NotImplementedError:
            raise AssertionError(
                f"{self.exercise}: not implemented yet. Replace the `raise NotImplementedError` with your code."
            ) from None

    def expect(self, condition: bool, hint: str) -> None:
        if not condition:
            raise AssertionError(f"{self.exercise}: {hint}")

    def passed(self, cases: int) -> None:
        print(f"\N{CHECK MARK} {self.exercise}: correct on {cases} cases.")


def _run(grader: _Grader, fn: Callable, args: tuple, call: str):
    """grader.call, plus: an exception inside the learner's code becomes a failure that names the input."""
    try:
        return grader.call(fn, *args)
    except (AssertionError, NotCallable):
        raise
    except Exception as err:  # a shape mismatch, a typo: say where, not a traceback from the grader
        raise AssertionError(f"{grader.exercise}: {call} raised {type(err).__name__}: {err}") from None


def _block_result(grader: _Grader, result, block, where: str):
    """A blockwise quantizer's (indices, absmax): checks the tuple, absmax = block.abs().max(), integer indices."""
    import torch

    grader.expect(
        isinstance(result, tuple) and len(result) == 2,
        f"expected a tuple (indices, absmax), got {type(result).__name__}.",
    )
    indices, absmax = result
    want = float(block.abs().max())
    grader.expect(
        abs(float(absmax) - want) <= 1e-6 * want,
        f"{where}: absmax should be {want:.4e}, got {float(absmax):.4e}. "
        "Hint: the largest magnitude, block.abs().max(), not block.max().",
    )
    grader.expect(
        isinstance(indices, torch.Tensor)
        and indices.shape == block.shape
        and not indices.is_floating_point(),
        f"indices should be an integer tensor of shape {tuple(block.shape)}, got {indices!r}.",
    )
    return indices, absmax
