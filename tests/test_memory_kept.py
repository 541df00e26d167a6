"""course.memory.bytes_kept_for_backward sees what saved-tensor hooks miss (notebook 08, section 4)."""

import json
import subprocess
import sys

import pytest

import course

# A fresh process: the function switches glibc to give freed blocks back at once, for the whole process.
_FRAGMENT = """
import json, torch, course
torch.manual_seed(0)
linear = torch.nn.Linear(576, 1536, bias=False)
layer4 = course.quant.Linear4bit.from_linear(linear, blocksize=64, quant_type="nf4", double_quant=True)
x = torch.randn(8, 80, 576, requires_grad=True)  # (B, T, in)


class KeepsItQuietly(torch.autograd.Function):  # a layer that hides its decoded weight from the hooks
    @staticmethod
    def forward(ctx, x):
        ctx.weight = layer4.dequantized(torch.float32)  # a plain attribute, not save_for_backward
        return x @ ctx.weight.T  # (B, T, out)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight


layers = {
    "plain": lambda: torch.nn.functional.linear(x, layer4.dequantized(torch.float32)),
    "hidden": lambda: KeepsItQuietly.apply(x),
    "ours": lambda: layer4(x),
}
out = {}
for name, fn in layers.items():
    out[name] = {
        "kept": course.memory.bytes_kept_for_backward(fn)[1],
        "hooks": course.memory.saved_tensor_bytes(fn, exclude=[x])[1],
    }
out["weight"] = linear.weight.nbytes
print(json.dumps(out))
"""


@pytest.mark.skipif(course.memory.rss_bytes() is None, reason="needs /proc (Linux)")
def test_kept_memory_catches_a_weight_that_the_hooks_miss():
    run = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    weight = got["weight"]  # 3.375 MiB of fp32
    assert got["plain"]["hooks"] == weight and abs(got["plain"]["kept"] - weight) < 0.1 * weight
    assert got["hidden"]["hooks"] == 0  # the counter-example: invisible to saved-tensor hooks ...
    assert abs(got["hidden"]["kept"] - weight) < 0.1 * weight  # ... but not to memory
    assert got["ours"]["hooks"] == 0 and got["ours"]["kept"] < 0.1 * weight  # decodes again in backward


def test_kept_memory_refuses_what_it_cannot_measure(monkeypatch):
    monkeypatch.setattr(course.memory, "rss_bytes", lambda: None)
    with pytest.raises(RuntimeError, match="needs Linux"):
        course.memory.bytes_kept_for_backward(lambda: None)
