"""Bad inputs across the public API: each is refused at the door, by `course`, and changes nothing.

One row per bad input: the module, a factory that builds the call `(fn, args, kwargs)` from
fresh objects, the exception (ValueError, or TypeError for a wrong type) and a regex that the
message must match: the part that says what was expected. For every row the test checks
1. the exception type and message,
2. that the innermost frame of the traceback is in the `course` package (not deep inside
   torch, json or Python: a learner should read our message, not a library's), and
3. that every tensor reachable from the arguments (modules' parameters and buffers, an
   optimizer's parameters and states) is bit-identical afterwards, and as trainable as before
   (a refused call must not freeze half a model either).
The adapter families (IA3, DoRA, QA-LoRA, prompt tuning, P-tuning, prefix tuning) have rows here
too: wrong ranks and token counts, wrong dtypes, targets that do not exist, a family applied twice
or on top of another adapter, and merges of NaN or inf or of values that overflow an fp16 base
(refused, the weights bit-identical; a model-level merge names the layer). LongLoRA and LoftQ are checked by
their own tests.
"""

import math
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import course
from course import (
    data,
    dora,
    env,
    ia3,
    lora,
    memory,
    models,
    optim,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    qalora,
    quant,
    serving,
    train,
)

COURSE_DIR = str(Path(course.__file__).resolve().parent)


@dataclass
class Case:
    module: str
    what: str
    make: object  # (tokenizer, tmp_path) -> (fn, args, kwargs)
    error: type
    match: str


def _tensors(obj, seen=None):
    """Every tensor reachable from obj: tensors, modules, optimizers, lists, tuples, dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.state_dict(keep_vars=True).values()
    elif isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            yield from group["params"]
        for state in obj.state.values():
            yield from _tensors(state)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _snapshot(objects):
    """(values, requires_grad) of every tensor: a refused call must neither write nor freeze anything."""
    return [
        (t.detach().clone(), t.requires_grad)
        for t in _tensors(objects)
        if isinstance(t, torch.Tensor) and t.device.type != "meta"
    ]


def _same(first: tuple, second: tuple) -> bool:
    """Bit-identical, NaN in the same places counting as equal (a row may hold a NaN on purpose)."""
    (a, a_grad), (b, b_grad) = first, second
    if a.dtype != b.dtype or a.shape != b.shape or a_grad != b_grad:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


# --- inputs the rows share ---------------------------------------------------------------------


def _lora_layer(**change):
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 8), r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    with torch.no_grad():
        for name, value in change.items():
            getattr(layer, name).weight[0, 0] = value
    return layer


def _tiny():
    return models.tiny_model(seed=0, num_hidden_layers=1, vocab_size=1000)


def _optimizer_with_grads(bad_grad=None):
    big, small = nn.Parameter(torch.randn(4096)), nn.Parameter(torch.randn(8))
    opt = optim.Adam8bit([big, small])
    big.grad, small.grad = torch.randn(4096), torch.randn(8)
    opt.step()
    big.grad, small.grad = torch.randn(4096), torch.randn(8)
    if bad_grad is not None:
        small.grad[0] = bad_grad
    return opt


def _linear4bit():
    return quant.Linear4bit.from_linear(nn.Linear(64, 32))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _task_dir(tmp_path: Path, line: str) -> Path:
    _write(tmp_path / "event_extraction" / "train.jsonl", '{"input": "a", "output": "b"}\n' + line + "\n")
    return tmp_path


def _empty_task_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "event_extraction" / "train.jsonl", "")
    return tmp_path


def _adapters(A_shape=(2, 16), B_shape=(8, 2)):
    return {"t": (torch.randn(A_shape), torch.randn(B_shape), 2.0)}


def _ia3_model(bad=None):
    """A one-layer model with IA3 vectors; `bad` goes into down_proj, the last of its three IA3 layers."""
    model = _tiny()
    ia3.add_ia3(model)
    if bad is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.ia3_l[0] = bad
    return model


def _ia3_layer(bad, dtype=torch.float32, bias=None):
    """An output-side IA3 layer whose vector holds `bad` at 0; `bias` goes into the base's bias[0]."""
    torch.manual_seed(0)
    layer = ia3.IA3Linear(nn.Linear(16, 8).to(dtype), feedforward=False)
    with torch.no_grad():
        layer.ia3_l[0] = bad
        if bias is not None:
            layer.base.bias[0] = bias
    return layer


def _quantized_model():
    """A one-layer model whose k_proj is a GroupQuantLinear, as after merge_qalora."""
    model = _tiny()
    qalora.quantize_layers_groupwise(model, ["k_proj"], group_size=16)
    return model


def _lora_model():
    model = _tiny()
    lora.add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    return model


def _dora_layer(part="lora_B", bad=None, dtype=torch.float32):
    torch.manual_seed(0)
    layer = dora.DoRALinear(nn.Linear(16, 8).to(dtype), r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    if bad is not None:
        with torch.no_grad():
            (layer.magnitude if part == "magnitude" else getattr(layer, part).weight).view(-1)[0] = bad
    return layer


def _dora_zero_row():
    """A DoRA layer whose W0 has a zero row: with B = 0 that row of V is zero, and m / ||V|| is 0 / 0."""
    base = nn.Linear(16, 8)
    with torch.no_grad():
        base.weight[0] = 0
    return dora.DoRALinear(base, r=2, alpha=4)


def _qalora_layer(bad=None, dtype=torch.float32):
    torch.manual_seed(0)
    layer = qalora.QALoRALinear(nn.Linear(32, 8).to(dtype), r=2, alpha=4, group_size=8)
    nn.init.normal_(layer.lora_B.weight)
    if bad is not None:
        with torch.no_grad():
            layer.lora_B.weight[0, 0] = bad
    return layer


def _qalora_model(bad=None):
    model = _tiny()
    qalora.add_qalora(model, ["q_proj", "v_proj"], r=2, alpha=4, group_size=16)
    if bad is not None:
        with torch.no_grad():
            model.model.layers[0].self_attn.v_proj.lora_B.weight[0, 0] = bad  # the second of the two
    return model


def _prompt(n=2):
    return prompt_tuning.PromptTuning(_tiny(), n)


def _prefix(n=2, projection=False):
    return prefix_tuning.PrefixTuning(_tiny(), n, prefix_projection=projection)


def _nan_prompt():
    model = p_tuning.PTuning(_tiny(), 2)
    with torch.no_grad():
        model.embedding.weight[0, 0] = math.nan
    return model


def _bad_prompt(bad, dtype=torch.float32):
    """Prompt tuning of a `dtype` model, `bad` in its (fp32) prompt; 1e6 is finite in fp32, inf in fp16."""
    model = prompt_tuning.PromptTuning(_tiny().to(dtype), 2)
    with torch.no_grad():
        model.embedding.weight[0, 0] = bad
    return model


def _bad_p_tuning(bad, dtype=torch.float32):
    """P-tuning whose encoder's last bias holds `bad`: every prompt row gets it."""
    model = p_tuning.PTuning(_tiny().to(dtype), 2)
    with torch.no_grad():
        model.mlp_head[-1].bias[0] = bad
    return model


def _nan_prefix():
    model = _prefix(projection=True)
    with torch.no_grad():
        model.transform[0].weight[0, 0] = math.nan
    return model


def _bad_prefix(bad, dtype=torch.float32):
    model = prefix_tuning.PrefixTuning(_tiny().to(dtype), 2)
    with torch.no_grad():
        model.embedding.weight[0, 0] = bad
    return model


class _NoCache(nn.Module):
    """A model whose forward has no cache argument (as an encoder-only model)."""

    config = models.tiny_model(num_hidden_layers=1, vocab_size=1000).config

    def forward(self, input_ids, attention_mask=None):
        return input_ids


# fmt: off
CASES = [
    # models
    Case("models", "unknown model name", lambda tok, tmp: (models.load_model, ("no-such-model",), {}), ValueError, "Course models"),
    Case("models", "model name not a string", lambda tok, tmp: (models.model_path, (123,), {}), TypeError, "non-empty string"),
    Case("models", "unknown quantization", lambda tok, tmp: (models.load_model, (), {"quantization": "int4"}), ValueError, "quantization must be one of"),
    Case("models", "dtype given as a string", lambda tok, tmp: (models.load_model, (), {"dtype": "fp32"}), TypeError, "torch.dtype"),
    Case("models", "unknown device", lambda tok, tmp: (models.load_model, (), {"device": "quantum"}), ValueError, "device must be"),
    Case("models", "tiny_model seed not an int", lambda tok, tmp: (models.tiny_model, ("0",), {}), TypeError, "seed must be an int"),
    # env
    Case("env", "seed not an int", lambda tok, tmp: (env.seed_everything, (1.5,), {}), ValueError, "seed must be an int"),
    Case("env", "negative seed", lambda tok, tmp: (env.seed_everything, (-1,), {}), ValueError, "seed must be an int >= 0"),
    Case("env", "unknown device", lambda tok, tmp: (env.compute_dtype, ("quantum",), {}), ValueError, "device must be"),
    # data
    Case("data", "unknown task", lambda tok, tmp: (data.load_task, ("poetry",), {}), ValueError, "Known tasks"),
    Case("data", "unknown split", lambda tok, tmp: (data.load_task, ("ticket_routing", "test_12h"), {}), ValueError, "Splits"),
    Case("data", "missing task file", lambda tok, tmp: (data.load_task, ("event_extraction",), {"data_dir": tmp}), ValueError, "does not exist.*python -m course.data"),
    Case("data", "malformed JSONL", lambda tok, tmp: (data.load_task, ("event_extraction",), {"data_dir": _task_dir(tmp, '{"input": "x", ')}), ValueError, "line 2: not valid JSON"),
    Case("data", "JSONL line without output", lambda tok, tmp: (data.load_task, ("event_extraction",), {"data_dir": _task_dir(tmp, '{"input": "x"}')}), ValueError, 'line 2: expected an object with string fields "input" and "output"'),
    Case("data", "JSONL line not an object", lambda tok, tmp: (data.load_task, ("event_extraction",), {"data_dir": _task_dir(tmp, "[1, 2]")}), ValueError, "line 2: expected an object"),
    Case("data", "empty JSONL", lambda tok, tmp: (data.load_task, ("event_extraction",), {"data_dir": _empty_task_dir(tmp)}), ValueError, "holds no examples"),
    Case("data", "example without task", lambda tok, tmp: (data.format_prompt, (tok, {"input": "hi"}), {}), ValueError, "example\\['task'\\] must be one of"),
    Case("data", "example without output", lambda tok, tmp: (data.tokenize_for_training, (tok, {"input": "hi", "task": "ticket_routing"}), {}), ValueError, 'needs a string "output"'),
    Case("data", "collate of nothing", lambda tok, tmp: (data.collate, ([], 2), {}), ValueError, "non-empty list"),
    Case("data", "collate with a string pad id", lambda tok, tmp: (data.collate, ([{"input_ids": [1], "labels": [1]}], "2"), {}), TypeError, "pad_id must be an int"),
    Case("data", "collate with ragged labels", lambda tok, tmp: (data.collate, ([{"input_ids": [1, 2], "labels": [1]}], 2), {}), ValueError, "same length"),
    Case("data", "exact_match of unequal lengths", lambda tok, tmp: (data.exact_match, (["a"], ["a", "b"]), {}), ValueError, "1 predictions for 2 references"),
    Case("data", "exact_match of a string", lambda tok, tmp: (data.exact_match, ("abc", "abd"), {}), TypeError, "list of strings"),
    Case("data", "exact_match of numbers", lambda tok, tmp: (data.exact_match, ([1], [1]), {}), TypeError, "list of strings"),
    Case("data", "field_accuracy of nothing", lambda tok, tmp: (data.field_accuracy, ([], []), {}), ValueError, "at least one example"),
    # lora
    Case("lora", "rank zero", lambda tok, tmp: (lora.LoRALinear, (nn.Linear(16, 8),), {"r": 0, "alpha": 4}), ValueError, "rank r must be an integer"),
    Case("lora", "rank as a float", lambda tok, tmp: (lora.LoRALinear, (nn.Linear(16, 8),), {"r": 2.5, "alpha": 4}), ValueError, "rank r must be an integer"),
    Case("lora", "alpha inf", lambda tok, tmp: (lora.LoRALinear, (nn.Linear(16, 8),), {"r": 2, "alpha": math.inf}), ValueError, "positive and finite"),
    Case("lora", "alpha nan", lambda tok, tmp: (lora.LoRALinear, (nn.Linear(16, 8),), {"r": 2, "alpha": math.nan}), ValueError, "positive and finite"),
    Case("lora", "alpha a string", lambda tok, tmp: (lora.LoRALinear, (nn.Linear(16, 8),), {"r": 2, "alpha": "16"}), TypeError, "alpha must be a number"),
    Case("lora", "dropout 1", lambda tok, tmp: (lora.LoRALinear, (nn.Linear(16, 8),), {"r": 2, "alpha": 4, "dropout": 1.0}), ValueError, r"dropout must be in \[0, 1\)"),
    Case("lora", "unknown init", lambda tok, tmp: (lora.LoRALinear, (nn.Linear(16, 8),), {"r": 2, "alpha": 4, "init": "pissa"}), ValueError, "init must be one of"),
    Case("lora", "wrapping an embedding", lambda tok, tmp: (lora.LoRALinear, (nn.Embedding(10, 4),), {"r": 2, "alpha": 4}), ValueError, "wraps a linear layer"),
    Case("lora", "targets that match nothing", lambda tok, tmp: (lora.add_lora, (_tiny(), ["qkv"]), {"r": 2, "alpha": 4}), ValueError, "matches no module.*q_proj"),
    Case("lora", "empty targets", lambda tok, tmp: (lora.add_lora, (_tiny(), []), {"r": 2, "alpha": 4}), ValueError, "target_modules is empty"),
    Case("lora", "merge of a NaN adapter", lambda tok, tmp: (_lora_layer(lora_B=math.nan).merge, (), {}), ValueError, "NaN or inf"),
    Case("lora", "merge of an inf adapter", lambda tok, tmp: (_lora_layer(lora_A=math.inf).merge, (), {}), ValueError, "NaN or inf"),
    Case("lora", "missing adapter file", lambda tok, tmp: (lora.load_adapter, (_tiny(), tmp / "none.safetensors"), {}), ValueError, "no adapter file"),
    Case("lora", "save without adapters", lambda tok, tmp: (lora.save_adapter, (_tiny(), tmp / "a.safetensors"), {}), ValueError, "no LoRA layers"),
    # quant
    Case("quant", "a list, not a tensor", lambda tok, tmp: (quant.quantize_4bit, ([0.1, 0.2],), {}), ValueError, "torch.Tensor"),
    Case("quant", "an integer tensor", lambda tok, tmp: (quant.quantize_4bit, (torch.arange(64),), {}), ValueError, "floating-point"),
    Case("quant", "float64", lambda tok, tmp: (quant.quantize_4bit, (torch.randn(64, dtype=torch.float64),), {}), ValueError, "fp32, fp16, bf16"),
    Case("quant", "an empty tensor", lambda tok, tmp: (quant.quantize_4bit, (torch.zeros(4, 0),), {}), ValueError, "empty"),
    Case("quant", "NaN", lambda tok, tmp: (quant.quantize_4bit, (torch.tensor([0.5, math.nan]),), {}), ValueError, "NaN or inf"),
    Case("quant", "inf in 8 bits", lambda tok, tmp: (quant.quantize_blockwise_8bit, (torch.tensor([0.5, math.inf]),), {}), ValueError, "NaN or inf"),
    Case("quant", "a meta tensor", lambda tok, tmp: (quant.quantize_4bit, (torch.empty(64, device="meta"),), {}), ValueError, "meta device"),
    Case("quant", "blocksize 48", lambda tok, tmp: (quant.quantize_4bit, (torch.randn(64),), {"blocksize": 48}), ValueError, "blocksize must be one of 32, 64"),
    Case("quant", "blocksize True", lambda tok, tmp: (quant.quantize_blockwise_8bit, (torch.randn(64),), {"blocksize": True}), ValueError, "power of two"),
    Case("quant", "unknown quant_type", lambda tok, tmp: (quant.quantize_4bit, (torch.randn(64),), {"quant_type": "nf8"}), ValueError, "quant_type must be one of"),
    Case("quant", "a code of 300 values", lambda tok, tmp: (quant.quantize_blockwise_8bit, (torch.randn(64), torch.linspace(-1, 1, 300)), {}), ValueError, "2..256 values"),
    Case("quant", "dequantize a plain tensor", lambda tok, tmp: (quant.dequantize_4bit, (torch.zeros(4, dtype=torch.uint8),), {}), ValueError, "Quantized4bit"),
    Case("quant", "dequantize 8-bit float codes", lambda tok, tmp: (quant.dequantize_blockwise_8bit, (torch.zeros(4), None), {}), ValueError, "uint8"),
    Case("quant", "dynamic code without exponent bits", lambda tok, tmp: (quant.dynamic_code, (True, 0, 8), {}), ValueError, "use max_exponent_bits >= 1"),
    Case("quant", "Linear4bit, wrong input width", lambda tok, tmp: (_linear4bit(), (torch.randn(2, 63),), {}), ValueError, "in_features=64"),
    Case("quant", "Linear4bit of a 1-D weight", lambda tok, tmp: (quant.Linear4bit, (quant.quantize_4bit(torch.randn(64)),), {}), ValueError, "2-D weight"),
    # optim
    Case("optim", "negative lr", lambda tok, tmp: (optim.Adam8bit, ([nn.Parameter(torch.zeros(3))],), {"lr": -1.0}), ValueError, "lr must be a finite number"),
    Case("optim", "eps nan", lambda tok, tmp: (optim.Adam8bit, ([nn.Parameter(torch.zeros(3))],), {"eps": math.nan}), ValueError, "eps and weight_decay must be finite"),
    Case("optim", "beta of 1", lambda tok, tmp: (optim.Adam8bit, ([nn.Parameter(torch.zeros(3))],), {"betas": (0.9, 1.0)}), ValueError, r"betas must be two numbers in \[0, 1\)"),
    Case("optim", "a NaN gradient", lambda tok, tmp: (_optimizer_with_grads(math.nan).step, (), {}), ValueError, "NaN or inf"),
    Case("optim", "AdamW's state dict", lambda tok, tmp: (optim.Adam8bit([nn.Parameter(torch.zeros(3))]).load_state_dict, ({"state": {0: {"step": 1, "exp_avg": torch.zeros(3)}}, "param_groups": [{"params": [0]}]},), {}), ValueError, "not an Adam8bit state"),
    Case("optim", "state bytes of a module", lambda tok, tmp: (optim.optimizer_state_bytes, (nn.Linear(2, 2),), {}), ValueError, "torch.optim.Optimizer"),
    Case("optim", "a page larger than the device", lambda tok, tmp: (optim.PagingSimulator, (1000, 0, [torch.zeros(100, dtype=torch.uint8)]), {"page_bytes": 2000}), ValueError, "larger than the device budget"),
    Case("optim", "an empty trace", lambda tok, tmp: (optim.PagingSimulator(1000, 0, [torch.zeros(100, dtype=torch.uint8)], page_bytes=10).replay, ([],), {}), ValueError, "non-empty list"),
    # memory
    Case("memory", "measure_peak of a number", lambda tok, tmp: (memory.measure_peak, (42,), {}), TypeError, "pass a function"),
    Case("memory", "unknown model config", lambda tok, tmp: (memory.load_model_config, ("gpt-9",), {}), ValueError, "Known:"),
    Case("memory", "unknown method", lambda tok, tmp: (memory.estimate_training_memory, ("smollm2-135m", "prefix"), {}), ValueError, "method must be one of"),
    Case("memory", "unknown optimizer", lambda tok, tmp: (memory.estimate_training_memory, ("smollm2-135m", "lora"), {"optimizer": "adafactor"}), ValueError, "optimizer must be one of"),
    # train
    Case("train", "zero steps", lambda tok, tmp: (train.train, (_tiny(), tok, data.load_task("ticket_routing").select(range(2))), {"steps": 0, "lr": 1e-3}), ValueError, "must be positive"),
    Case("train", "lr nan", lambda tok, tmp: (train.train, (_tiny(), tok, data.load_task("ticket_routing").select(range(2))), {"steps": 1, "lr": math.nan}), ValueError, "lr must be a finite number"),
    Case("train", "steps as a string", lambda tok, tmp: (train.train, (_tiny(), tok, data.load_task("ticket_routing").select(range(2))), {"steps": "1", "lr": 1e-3}), TypeError, "steps must be an int"),
    Case("train", "unknown optimizer", lambda tok, tmp: (train.train, (_tiny(), tok, data.load_task("ticket_routing").select(range(2))), {"steps": 1, "lr": 1e-3, "optimizer": "sgd"}), ValueError, "'adamw' or a callable"),
    Case("train", "a frozen model", lambda tok, tmp: (train.train, (_tiny().requires_grad_(False), tok, data.load_task("ticket_routing").select(range(2))), {"steps": 1, "lr": 1e-3}), ValueError, "no trainable parameters"),
    Case("train", "an empty dataset", lambda tok, tmp: (train.train, (_tiny(), tok, []), {"steps": 1, "lr": 1e-3}), ValueError, "dataset is empty"),
    # serving
    Case("serving", "unknown tenant", lambda tok, tmp: (serving.check_tenants, (["acme"], ["globex"]), {}), ValueError, "unknown tenant.*'acme'.*knows 'globex'"),
    Case("serving", "fewer names than rows", lambda tok, tmp: (serving.mixed_lora_linear, (torch.randn(3, 16), nn.Linear(16, 8), _adapters(), ["t"]), {}), ValueError, "one adapter name per row"),
    Case("serving", "input of the wrong width", lambda tok, tmp: (serving.mixed_lora_linear, (torch.randn(1, 15), nn.Linear(16, 8), _adapters(), ["t"]), {}), ValueError, "in_features=16"),
    Case("serving", "an adapter of the wrong shape", lambda tok, tmp: (serving.mixed_lora_linear, (torch.randn(1, 16), nn.Linear(16, 8), _adapters(A_shape=(2, 12)), ["t"]), {}), ValueError, r"expected A \(r, 16\)"),
    Case("serving", "max_new_tokens 0", lambda tok, tmp: (serving.AdapterServer, (_tiny(), tok), {"max_new_tokens": 0}), ValueError, "positive int"),
    Case("serving", "a server of a string", lambda tok, tmp: (serving.AdapterServer, ("smollm2", tok), {}), TypeError, "torch.nn.Module"),
    Case("serving", "a folder without an adapter", lambda tok, tmp: (serving.AdapterServer(_tiny(), tok).add_tenant, ("acme", tmp), {}), ValueError, "not an adapter folder"),
    Case("serving", "the base name as a tenant", lambda tok, tmp: (serving.AdapterServer(_tiny(), tok).add_tenant, (serving.BASE, tmp), {}), ValueError, "non-empty string other than"),
    Case("serving", "no requests", lambda tok, tmp: (serving.AdapterServer(_tiny(), tok).generate, ([],), {}), ValueError, r"list of \(tenant, prompt\) pairs"),
    # ia3
    Case("ia3", "IA3 twice", lambda tok, tmp: (ia3.add_ia3, (_ia3_model(),), {}), ValueError, "already has IA3 vectors.*merge_ia3.*fresh copy"),
    Case("ia3", "IA3 around an IA3 layer", lambda tok, tmp: (ia3.IA3Linear, (_ia3_layer(1.0),), {"feedforward": False}), ValueError, "already has an IA3 vector"),
    Case("ia3", "IA3 around a LoRA layer", lambda tok, tmp: (ia3.IA3Linear, (_lora_layer(),), {"feedforward": False}), ValueError, "already holds an adapter"),
    Case("ia3", "IA3 on a norm", lambda tok, tmp: (ia3.add_ia3, (_tiny(), ("k_proj", "input_layernorm"), ()), {}), ValueError, "linear layer, got LlamaRMSNorm"),
    Case("ia3", "targets that match nothing", lambda tok, tmp: (ia3.add_ia3, (_tiny(), ("qkv",), ()), {}), ValueError, "matches no module.*k_proj"),
    Case("ia3", "feed-forward not among the targets", lambda tok, tmp: (ia3.add_ia3, (_tiny(), ("k_proj",), ("down_proj",)), {}), ValueError, "must also be in target_modules"),
    Case("ia3", "feed-forward given as a string", lambda tok, tmp: (ia3.add_ia3, (_tiny(), ["k_proj", "down_proj"], "down_proj"), {}), ValueError, "as a list too"),
    Case("ia3", "merge of a NaN vector", lambda tok, tmp: (_ia3_layer(math.nan).merge, (), {}), ValueError, "NaN or inf"),
    Case("ia3", "merge_ia3 of an inf vector", lambda tok, tmp: (ia3.merge_ia3, (_ia3_model(math.inf),), {}), ValueError, "merge_ia3 refused at model.layers.0.mlp.down_proj .*NaN or inf"),
    Case("ia3", "merge of an inf vector", lambda tok, tmp: (_ia3_layer(math.inf).merge, (), {}), ValueError, "merged weight would hold NaN or inf"),
    Case("ia3", "merge that overflows fp16", lambda tok, tmp: (_ia3_layer(1e6, torch.float16).merge, (), {}), ValueError, "overflows the base's dtype"),
    Case("ia3", "merge whose bias overflows fp16", lambda tok, tmp: (_ia3_layer(4.0, torch.float16, bias=60000.0).merge, (), {}), ValueError, "merged bias would hold NaN or inf"),
    Case("ia3", "IA3 on a 4-bit layer", lambda tok, tmp: (ia3.IA3Linear, (_linear4bit(),), {"feedforward": False}), ValueError, "Linear4bit, a linear layer stored quantized.*before quantizing"),
    Case("ia3", "IA3 on a quantized model", lambda tok, tmp: (ia3.add_ia3, (_quantized_model(),), {}), ValueError, "GroupQuantLinear, a linear layer stored quantized"),
    Case("ia3", "IA3 on a LoRA model", lambda tok, tmp: (ia3.add_ia3, (_lora_model(), ("q_proj", "v_proj"), ()), {}), ValueError, "already holds an adapter \\(LoRALinear.*merge that adapter first"),
    Case("ia3", "a refused add_ia3 freezes nothing", lambda tok, tmp: (ia3.add_ia3, (_tiny(), ("k_proj", "input_layernorm"), ()), {}), ValueError, "not norms or activations"),
    # dora
    Case("dora", "rank zero", lambda tok, tmp: (dora.DoRALinear, (nn.Linear(16, 8),), {"r": 0, "alpha": 4}), ValueError, r"r must be an integer in 1..min\(in_features, out_features\) = 1..8"),
    Case("dora", "rank above min(in, out)", lambda tok, tmp: (dora.DoRALinear, (nn.Linear(16, 8),), {"r": 9, "alpha": 4}), ValueError, r"1\.\.8, got 9"),
    Case("dora", "rank as a float", lambda tok, tmp: (dora.DoRALinear, (nn.Linear(16, 8),), {"r": 2.0, "alpha": 4}), ValueError, "r must be an integer"),
    Case("dora", "alpha inf", lambda tok, tmp: (dora.DoRALinear, (nn.Linear(16, 8),), {"r": 2, "alpha": math.inf}), ValueError, "positive, finite"),
    Case("dora", "DoRA twice", lambda tok, tmp: (dora.DoRALinear, (_dora_layer(),), {"r": 2, "alpha": 4}), ValueError, "already has a DoRA adapter"),
    Case("dora", "DoRA on a 4-bit layer", lambda tok, tmp: (dora.DoRALinear, (_linear4bit(),), {"r": 2, "alpha": 4}), TypeError, "wraps an nn.Linear.*dense W0"),
    Case("dora", "from a plain peft-less layer", lambda tok, tmp: (dora.dora_from_peft, (nn.Linear(8, 4),), {}), ValueError, "use_dora=True"),
    Case("dora", "merge of a NaN magnitude", lambda tok, tmp: (_dora_layer("magnitude", math.nan).merged_weight, (), {}), ValueError, "NaN or inf"),
    Case("dora", "merge of an inf B", lambda tok, tmp: (_dora_layer("lora_B", math.inf).merged_weight, (), {}), ValueError, "NaN or inf"),
    Case("dora", "merge that overflows fp16", lambda tok, tmp: (_dora_layer("magnitude", 1e6, torch.float16).merged_weight, (), {}), ValueError, "overflows the base's dtype"),
    Case("dora", "merge with a zero row of V", lambda tok, tmp: (_dora_zero_row().merged_weight, (), {}), ValueError, "a row of V is zero"),
    Case("dora", "DoRA around a LoRA layer", lambda tok, tmp: (dora.DoRALinear, (_lora_layer(),), {"r": 2, "alpha": 4}), ValueError, "already holds an adapter \\(LoRALinear.*merge that adapter first"),
    Case("dora", "DoRA around an IA3 layer", lambda tok, tmp: (dora.DoRALinear, (_ia3_layer(1.0),), {"r": 2, "alpha": 4}), ValueError, "already holds an adapter \\(IA3Linear"),
    # qalora
    Case("qalora", "rank above the number of groups", lambda tok, tmp: (qalora.QALoRALinear, (nn.Linear(32, 10),), {"r": 5, "alpha": 4, "group_size": 8}), ValueError, r"in_features / group_size.*1\.\.4"),
    Case("qalora", "rank as a float", lambda tok, tmp: (qalora.QALoRALinear, (nn.Linear(32, 10),), {"r": 2.5, "alpha": 4, "group_size": 8}), ValueError, "r must be in"),
    Case("qalora", "alpha nan", lambda tok, tmp: (qalora.QALoRALinear, (nn.Linear(32, 10),), {"r": 2, "alpha": math.nan, "group_size": 8}), ValueError, "positive and finite"),
    Case("qalora", "group size that does not divide", lambda tok, tmp: (qalora.QALoRALinear, (nn.Linear(32, 10),), {"r": 2, "alpha": 4, "group_size": 5}), ValueError, "group_size must divide in_features = 32"),
    Case("qalora", "integer weights", lambda tok, tmp: (qalora.quantize_groupwise, (torch.ones(4, 8, dtype=torch.int64), 4), {}), TypeError, "floating-point"),
    Case("qalora", "float codes", lambda tok, tmp: (qalora.GroupQuantLinear, (torch.zeros(4, 8), torch.ones(4, 2), torch.zeros(4, 2)), {}), TypeError, "uint8"),
    Case("qalora", "QA-LoRA around a QA-LoRA layer", lambda tok, tmp: (qalora.QALoRALinear, (_qalora_layer(),), {"r": 2, "alpha": 4, "group_size": 8}), ValueError, "already has a QA-LoRA adapter"),
    Case("qalora", "add_qalora twice", lambda tok, tmp: (qalora.add_qalora, (_qalora_model(), ["q_proj"]), {"r": 2, "alpha": 4, "group_size": 16}), ValueError, "already has QA-LoRA adapters"),
    Case("qalora", "targets that match nothing", lambda tok, tmp: (qalora.add_qalora, (_tiny(), ["qkv"]), {"r": 2, "alpha": 4, "group_size": 16}), ValueError, "matches no module.*q_proj"),
    Case("qalora", "a later target refuses the rank", lambda tok, tmp: (qalora.add_qalora, (_tiny(), ["q_proj", "k_proj"]), {"r": 40, "alpha": 4, "group_size": 1}), ValueError, r"1\.\.32"),
    Case("qalora", "merge of a NaN adapter", lambda tok, tmp: (_qalora_layer(math.nan).merge, (), {}), ValueError, "NaN or inf"),
    Case("qalora", "merge_qalora of an inf adapter", lambda tok, tmp: (qalora.merge_qalora, (_qalora_model(math.inf),), {}), ValueError, "merge_qalora refused at model.layers.0.self_attn.v_proj .*NaN or inf"),
    Case("qalora", "merge that overflows fp16", lambda tok, tmp: (_qalora_layer(1e9, torch.float16).merge, (), {}), ValueError, "overflows the base's dtype"),
    Case("qalora", "QA-LoRA on a LoRA model", lambda tok, tmp: (qalora.add_qalora, (_lora_model(), ["q_proj"]), {"r": 2, "alpha": 4, "group_size": 16}), ValueError, "already holds an adapter \\(LoRALinear.*merge that adapter first"),
    Case("qalora", "QA-LoRA around an IA3 layer", lambda tok, tmp: (qalora.QALoRALinear, (_ia3_layer(1.0),), {"r": 2, "alpha": 4, "group_size": 8}), ValueError, "already holds an adapter \\(IA3Linear"),
    # prompt_tuning
    Case("prompt_tuning", "zero virtual tokens", lambda tok, tmp: (prompt_tuning.PromptTuning, (_tiny(), 0), {}), ValueError, "num_virtual_tokens must be a positive integer"),
    Case("prompt_tuning", "virtual tokens True", lambda tok, tmp: (prompt_tuning.PromptTuning, (_tiny(), True), {}), ValueError, "positive integer.*got True"),
    Case("prompt_tuning", "init text for 2.5 tokens", lambda tok, tmp: (prompt_tuning.init_ids_from_text, (tok, "hi", 2.5), {}), ValueError, "positive number of soft tokens"),
    Case("prompt_tuning", "init ids as floats", lambda tok, tmp: (prompt_tuning.PromptTuning, (_tiny(), 2, [1.0, 2.0]), {}), TypeError, "list of token ids"),
    Case("prompt_tuning", "init ids outside the vocabulary", lambda tok, tmp: (prompt_tuning.PromptTuning, (_tiny(), 2, [1, 5000]), {}), ValueError, r"0\.\.999"),
    Case("prompt_tuning", "prompt tuning twice", lambda tok, tmp: (prompt_tuning.PromptTuning, (_prompt(), 2), {}), ValueError, "already a PromptTuning"),
    Case("prompt_tuning", "float input_ids", lambda tok, tmp: (_prompt(), (torch.zeros(1, 3),), {}), TypeError, "integer tensor of token ids"),
    Case("prompt_tuning", "prompts of the wrong width", lambda tok, tmp: (_prompt(), (torch.ones(1, 3, dtype=torch.long),), {"prompts": torch.zeros(1, 2, 8)}), ValueError, "prompts must have shape"),
    Case("prompt_tuning", "soft prompt holding NaN", lambda tok, tmp: (_nan_prompt().soft_prompt, (), {}), ValueError, "NaN or inf"),
    Case("prompt_tuning", "soft prompt holding inf", lambda tok, tmp: (_bad_prompt(math.inf).soft_prompt, (), {}), ValueError, "NaN or inf"),
    Case("prompt_tuning", "soft prompt that overflows fp16", lambda tok, tmp: (_bad_prompt(1e6, torch.float16).soft_prompt, (), {}), ValueError, "overflows the model's torch.float16"),
    # p_tuning
    Case("p_tuning", "negative virtual tokens", lambda tok, tmp: (p_tuning.PTuning, (_tiny(), -1), {}), ValueError, "num_virtual_tokens must be a positive integer"),
    Case("p_tuning", "unknown encoder", lambda tok, tmp: (p_tuning.PTuning, (_tiny(), 2), {"encoder": "GRU"}), ValueError, "encoder must be one of"),
    Case("p_tuning", "encoder width 0", lambda tok, tmp: (p_tuning.PTuning, (_tiny(), 2), {"encoder_hidden_size": 0}), ValueError, "encoder_hidden_size must be a positive integer"),
    Case("p_tuning", "P-tuning of a prefix-tuned model", lambda tok, tmp: (p_tuning.PTuning, (_prefix(), 2), {}), ValueError, "already a PrefixTuning"),
    Case("p_tuning", "P-tuning twice", lambda tok, tmp: (p_tuning.PTuning, (_bad_p_tuning(0.0), 2), {}), ValueError, "already a PTuning with 2 virtual tokens.*`model.model`"),
    Case("p_tuning", "encoder output holding inf", lambda tok, tmp: (_bad_p_tuning(math.inf).soft_prompt, (), {}), ValueError, "NaN or inf"),
    Case("p_tuning", "encoder output that overflows fp16", lambda tok, tmp: (_bad_p_tuning(1e6, torch.float16).soft_prompt, (), {}), ValueError, "overflows the model's torch.float16"),
    # prefix_tuning
    Case("prefix_tuning", "2.5 virtual tokens", lambda tok, tmp: (prefix_tuning.PrefixTuning, (_tiny(), 2.5), {}), ValueError, "num_virtual_tokens must be a positive integer"),
    Case("prefix_tuning", "a model without a KV cache", lambda tok, tmp: (prefix_tuning.PrefixTuning, (_NoCache(), 2), {}), ValueError, "KV cache"),
    Case("prefix_tuning", "prefix tuning twice", lambda tok, tmp: (prefix_tuning.PrefixTuning, (_prefix(), 2), {}), ValueError, "already a PrefixTuning"),
    Case("prefix_tuning", "encoder width 0", lambda tok, tmp: (prefix_tuning.PrefixTuning, (_tiny(), 2), {"prefix_projection": True, "encoder_hidden_size": 0}), ValueError, "encoder_hidden_size must be a positive integer"),
    Case("prefix_tuning", "a prefix of the wrong shape", lambda tok, tmp: (_prefix().past_key_values, (1, torch.zeros(3, 8)), {}), ValueError, "a prefix has shape"),
    Case("prefix_tuning", "an integer prefix", lambda tok, tmp: (_prefix().past_key_values, (1, torch.zeros(2, 64, dtype=torch.long)), {}), TypeError, "floating-point"),
    Case("prefix_tuning", "stored prefix holding NaN", lambda tok, tmp: (_nan_prefix().stored_prefix, (), {}), ValueError, "NaN or inf"),
    Case("prefix_tuning", "stored prefix holding inf", lambda tok, tmp: (_bad_prefix(-math.inf).stored_prefix, (), {}), ValueError, "NaN or inf"),
    Case("prefix_tuning", "prefix that overflows fp16", lambda tok, tmp: (_bad_prefix(1e6, torch.float16).stored_prefix, (), {}), ValueError, "overflows the model's torch.float16"),
]
# fmt: on


def test_the_table_covers_every_module_with_enough_rows():
    assert len(CASES) >= 40
    assert {c.module for c in CASES} >= {
        "models",
        "data",
        "lora",
        "quant",
        "optim",
        "memory",
        "train",
        "serving",
        "ia3",
        "dora",
        "qalora",
        "prompt_tuning",
        "p_tuning",
        "prefix_tuning",
    }


@pytest.mark.parametrize("case", CASES, ids=[f"{c.module}: {c.what}" for c in CASES])
def test_bad_input_is_refused_at_the_door_and_changes_nothing(case, tokenizer, tmp_path):
    fn, args, kwargs = case.make(tokenizer, tmp_path)
    before = _snapshot([fn.__self__ if hasattr(fn, "__self__") else None, args, kwargs, fn])
    with pytest.raises(case.error, match=case.match) as info:
        fn(*args, **kwargs)
    assert info.type in (ValueError, TypeError) or issubclass(info.type, (ValueError, TypeError))
    assert not (case.error is ValueError and info.type is TypeError)
    where = traceback.extract_tb(info.tb)[-1].filename
    assert str(Path(where).resolve()).startswith(COURSE_DIR), f"raised in {where}, not by course"
    after = _snapshot([fn.__self__ if hasattr(fn, "__self__") else None, args, kwargs, fn])
    assert len(after) == len(before)
    assert all(_same(a, b) for a, b in zip(after, before, strict=True)), "an input was changed"


def test_the_snapshot_sees_a_freeze():
    """The check can fail on requires_grad alone: a refused call that froze a layer is caught."""
    model = _tiny()
    before = _snapshot([model])
    model.model.layers[0].self_attn.k_proj.requires_grad_(False)
    assert not all(_same(a, b) for a, b in zip(_snapshot([model]), before, strict=True))


def test_the_snapshot_sees_an_in_place_change():
    """The 'changes nothing' check can fail: an update in place is caught."""
    opt = _optimizer_with_grads()
    before = _snapshot([opt])
    opt.step()
    after = _snapshot([opt])
    assert not all(_same(a, b) for a, b in zip(after, before, strict=True))
