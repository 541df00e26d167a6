"""Multi-tenant serving: mixed batches equal single-adapter runs, and tenants stay isolated."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import course
from course.serving import BASE, AdapterServer, check_tenants, group_by_tenant, mixed_lora_linear

PROMPTS = [
    "Route: I was charged twice",
    "Mon 10:00 lunch with Olu at the gym",
    "hi",
    "Reset my password",
    "ok",
]


def _save_adapter(folder, seed: int, r: int, targets) -> None:
    """A random, non-zero adapter (init_lora_weights=False: B is not zero) saved as peft does."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    get_peft_model(course.models.tiny_model(), config).save_pretrained(folder)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    # different ranks and targets on purpose: a mixed batch must handle both
    _save_adapter(root / "events", seed=10, r=4, targets=["q_proj", "v_proj"])
    _save_adapter(root / "tickets", seed=11, r=8, targets=["q_proj", "v_proj", "down_proj"])
    return root


@pytest.fixture
def server(adapter_dirs, tokenizer):
    server = AdapterServer(course.models.tiny_model(), tokenizer, max_new_tokens=6)
    server.add_tenant("events", adapter_dirs / "events")
    server.add_tenant("tickets", adapter_dirs / "tickets")
    return server


def _encode(tokenizer, prompts):
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


def _logits(server, enc, adapter_names=None):
    with torch.no_grad():
        return server.model(**enc, adapter_names=adapter_names).logits  # (B, T, V)


def test_mixed_batch_equals_single_adapter_runs_row_by_row(server, tokenizer):
    tenants = ["events", "tickets", BASE, "tickets", "events"]
    enc = _encode(tokenizer, PROMPTS)
    mixed = _logits(server, enc, tenants)
    for tenant in ("events", "tickets"):
        server.model.set_adapter(tenant)
        alone = _logits(server, enc)  # the whole batch through this one adapter
        rows = [i for i, t in enumerate(tenants) if t == tenant]
        # the same operations on the same rows (the LoRA product on a sub-batch): fp32 rounding at most
        torch.testing.assert_close(mixed[rows], alone[rows], rtol=0, atol=1e-5)
        others = [i for i, t in enumerate(tenants) if t != tenant]
        assert (mixed[others] - alone[others]).abs().max() > 1e-2  # the other rows really are different
    requests = list(zip(tenants, PROMPTS, strict=True))
    assert server.generate(requests) == server.generate_swapping(requests)


def test_base_requests_equal_the_plain_base_model(server, tokenizer):
    enc = _encode(tokenizer, PROMPTS)
    plain = course.models.tiny_model()  # the same random weights, never touched by peft
    with torch.no_grad():
        want = plain(**enc).logits
    mixed = _logits(server, enc, [BASE, "events", BASE, "tickets", BASE])
    with server.model.disable_adapter():
        disabled = _logits(server, enc)
    rows = [0, 2, 4]
    torch.testing.assert_close(mixed[rows], want[rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(disabled, want, rtol=0, atol=1e-6)
    base_requests = [(BASE, p) for p in PROMPTS]
    answers = AdapterServer(plain, tokenizer, max_new_tokens=6).generate(base_requests)
    assert server.generate(base_requests) == answers


@pytest.mark.parametrize("unknown", ["Events", "billing", ""])
def test_unknown_tenant_is_refused_naming_the_known_ones(server, unknown):
    requests = [("events", PROMPTS[0]), (unknown, PROMPTS[1])]
    for serve in (server.generate, server.generate_swapping):
        with pytest.raises(ValueError, match=rf"unknown tenant.*{unknown!r}.*'events', 'tickets'"):
            serve(requests)
    with pytest.raises(ValueError, match="unknown tenant"):
        server.adapter_bytes(unknown)


def test_tenants_never_leak_into_each_other(server, tokenizer, adapter_dirs):
    tenants = ["events", "tickets", "events", "tickets", BASE]
    enc = _encode(tokenizer, PROMPTS)
    before = _logits(server, enc, tenants)
    with torch.no_grad():  # wreck the tickets adapter: events rows and base rows must not notice
        for name, p in server.model.named_parameters():
            if ".tickets." in name:
                p.mul_(100.0).add_(1.0)
    after = _logits(server, enc, tenants)
    untouched = [i for i, t in enumerate(tenants) if t != "tickets"]
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.allclose(after[[1, 3]], before[[1, 3]])  # the change did reach the tickets rows


def test_add_tenant_refuses_bad_names_and_folders(server, adapter_dirs, tmp_path):
    with pytest.raises(ValueError, match="already exists"):
        server.add_tenant("events", adapter_dirs / "tickets")
    with pytest.raises(ValueError, match="__base__"):
        server.add_tenant(BASE, adapter_dirs / "events")
    with pytest.raises(ValueError, match="adapter_config.json"):
        server.add_tenant("new", tmp_path)
    dora = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    get_peft_model(course.models.tiny_model(), dora).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        server.add_tenant("new", tmp_path / "dora")
    assert server.tenants == ["events", "tickets"]


def test_adapter_bytes_counts_each_tenants_lora_weights(server):
    config = course.models.tiny_model().config
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    events = layers * 4 * ((h + h) + (h + kv))  # r=4 on q (h -> h) and v (h -> kv)
    tickets = layers * 8 * ((h + h) + (h + kv) + (i + h))  # r=8 on q, v, down (i -> h)
    assert server.adapter_bytes("events") == 4 * events  # fp32
    assert server.adapter_bytes("tickets") == 4 * tickets


def test_group_by_tenant_keeps_request_order_and_refuses_unknowns():
    assert group_by_tenant(["a", "b", "a", BASE, "b"], known=["a", "b"]) == {
        "a": [0, 2],
        "b": [1, 4],
        BASE: [3],
    }
    assert list(group_by_tenant(["b", "a"], known=["a", "b"])) == ["b", "a"]
    with pytest.raises(ValueError, match="'c'.*'a', 'b'"):
        group_by_tenant(["a", "c"], known=["a", "b"])
    check_tenants([BASE], known=[])  # the base model is always there


def test_mixed_lora_linear_by_hand_equals_peft(server, tokenizer):
    """Our per-row LoRA formula equals peft's mixed-batch forward of a real adapted layer."""
    layer = server.model.base_model.model.model.layers[0].self_attn.q_proj  # a peft lora.Linear
    x = torch.randn(5, 3, layer.in_features)  # (B, T, in)
    names = ["tickets", BASE, "events", "events", "tickets"]
    adapters = {
        t: (layer.lora_A[t].weight, layer.lora_B[t].weight, layer.scaling[t]) for t in ("events", "tickets")
    }
    with torch.no_grad():
        ours = mixed_lora_linear(x, layer.base_layer, adapters, names)
        theirs = layer(x, adapter_names=names)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one adapter name per row"):
        mixed_lora_linear(x, layer.base_layer, adapters, names[:2])
    with pytest.raises(ValueError, match="unknown tenant"):
        mixed_lora_linear(x, layer.base_layer, adapters, ["nobody"] * 5)
