"""course.export: merged == adapter, fp16 safetensors and GGUF round trips give the same greedy answers."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import course
from course import export

PROMPTS = ["<|im_start|>user\nlights off<|im_end|>\n<|im_start|>assistant\n", "timer 5 min please"]


def _peft(model, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft 0.21.2 reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(model, config).eval()


def _greedy(model, tokenizer, n=6):
    enc = course.train.left_padded(tokenizer, PROMPTS, "cpu")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1] :].tolist()


def _fp16_exact(model):
    """A tiny model whose weights are fp16 values (held in fp32): the F16 round trip must be lossless."""
    return model.to(torch.float16).to(torch.float32)


def test_permute_qk_is_undone_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    assert export.permute_qk(np.arange(4.0)[:, None], n_head=1)[:, 0].tolist() == [0, 2, 1, 3]
    weight = np.random.default_rng(0).standard_normal((12, 5))
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    assert np.array_equal(undo(export.permute_qk(weight, 3), 3, 3), weight)
    assert not np.array_equal(undo(weight, 3, 3), weight)  # without our permutation the loader scrambles q/k
    with pytest.raises(ValueError, match="heads"):
        export.permute_qk(weight, 5)


def test_merge_equals_the_adapter_model_and_fp16_reload_gives_the_same_greedy_answers(tmp_path, tokenizer):
    adapter = _peft(course.models.tiny_model())
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    merged = export.merge_adapter(adapter)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        diff = (merged(ids).logits - adapter(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5  # fp32: W + scaling * B A folds the same sum in another order
    folder = export.save_fp16(merged, tokenizer, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert next(AutoModelForCausalLM.from_pretrained(folder).parameters()).dtype == torch.float16
    assert _greedy(reloaded, tokenizer) == _greedy(adapter, tokenizer)


def test_dequantize_then_merge_matches_the_4bit_adapter_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    course.models.tiny_model().save_pretrained(tmp_path / "tiny")
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base4 = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", quantization_config=nf4, device_map={"": "cpu"}
    )
    course.kernel_path.use_reference_kernel(base4)  # as course.models.load_model does: no in-place repack
    adapter = _peft(base4)
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        want = adapter(input_ids=ids).logits  # eval mode on the reference path: dequantize, then F.linear
    merged = export.merge_adapter(adapter)  # dequantize-then-merge
    with torch.no_grad():
        diff = (merged(ids).logits - want).abs().max().item()
    assert diff < 1e-4
    # counter-example: merging into the original fp32 weights is not what was trained against
    naive = export.merge_adapter(_peft(course.models.tiny_model()))
    with torch.no_grad():
        assert (naive(ids).logits - want).abs().max().item() > 10 * diff


@pytest.mark.parametrize("gguf_type", export.GGUF_TYPES)
def test_gguf_round_trip_through_transformers_loader(tmp_path, tokenizer, gguf_type):
    model = _fp16_exact(export.merge_adapter(_peft(course.models.tiny_model())))
    path = export.write_gguf(model, tokenizer, tmp_path / f"tiny-{gguf_type}.gguf", gguf_type)
    loaded, loaded_tokenizer = export.load_gguf(path, with_tokenizer=gguf_type == "F16")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    errors = {name: (ours[name] - theirs[name]).abs().max().item() for name in ours}
    if gguf_type == "F16":
        assert max(errors.values()) == 0.0  # fp16 values stored as F16: lossless, q/k permutation undone
        assert _greedy(loaded, loaded_tokenizer) == _greedy(model, tokenizer)
        assert loaded_tokenizer.chat_template == tokenizer.chat_template
        assert loaded_tokenizer.eos_token == "<|im_end|>"
    else:  # Q8_0: 32 values share one fp16 scale absmax/127: off by half a step plus the scale's fp16 rounding
        for name, error in errors.items():
            bound = 0.0 if ours[name].ndim == 1 else ours[name].abs().max().item() / 127 * 0.6
            assert error <= bound + 1e-6, name
        assert max(errors.values()) > 0
    with pytest.raises(ValueError, match="F16"):
        export.write_gguf(model, tokenizer, tmp_path / "x.gguf", "Q4_K")


@pytest.mark.embedded
def test_gguf_tokenizer_metadata_equals_the_shipped_smollm2_file(tmp_path, tokenizer):
    import gguf

    from course.models import _gguf_path

    path = export.write_gguf(course.models.tiny_model(num_hidden_layers=1), tokenizer, tmp_path / "t.gguf")
    shipped, ours = gguf.GGUFReader(_gguf_path()), gguf.GGUFReader(path)

    def value(reader, key):
        field = reader.fields[key]
        return [bytes(field.parts[i]) for i in field.data]

    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id", "pre"):
        assert value(ours, f"tokenizer.ggml.{key}") == value(shipped, f"tokenizer.ggml.{key}"), key
    assert value(ours, "tokenizer.chat_template") == value(shipped, "tokenizer.chat_template")


# --- the Ollama Modelfile, checked by rendering its Go template ----------------------------
# A renderer for the part of Go's text/template (pkg.go.dev/text/template) that the TEMPLATE uses:
# {{ range $i, $_ := .Messages }}, {{ if C }} / {{ else }} / {{ end }}, {{ .Field }} and {{ $var }} output;
# C calls eq, ne, and, or, not on .Field, $var, "string" and integer operands, with parentheses.
# "{{- " trims all whitespace before the action, " -}}" all whitespace after it ("Text and spaces").
_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_SPACE = " \t\r\n"  # what Go's trim markers remove
_FUNCS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "and": lambda *args: all(args),
    "or": lambda *args: any(args),
}


def _tokens(template: str) -> list[tuple[str, str]]:
    items, pos = [], 0  # text, match, text, match, ..., text
    for match in _ACTION.finditer(template):
        items += [template[pos : match.start()], match]
        pos = match.end()
    items.append(template[pos:])
    for k in range(1, len(items), 2):
        if items[k].group(1):
            items[k - 1] = items[k - 1].rstrip(_SPACE)
        if items[k].group(3):
            items[k + 1] = items[k + 1].lstrip(_SPACE)
    return [("text", x) if k % 2 == 0 else ("action", x.group(2)) for k, x in enumerate(items)]


def _parse(tokens, i=0, stop=()):
    """(nodes, index of the closing action) for tokens[i:] up to an action whose first word is in stop."""
    nodes = []
    while i < len(tokens):
        kind, text = tokens[i]
        word = text.split()[0] if kind == "action" else None
        if word in stop:
            return nodes, i
        if kind == "text":
            nodes.append(("text", text))
        elif word == "if":
            then, i = _parse(tokens, i + 1, ("else", "end"))
            other = []
            if tokens[i][1] == "else":
                other, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("if", text[2:], then, other))
        elif word == "range":
            body, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", text[5:], body))
        elif word in ("else", "end"):
            raise ValueError(f"{{{{ {text} }}}} without an open if or range")
        else:
            nodes.append(("out", text))
        i += 1
    if stop:
        raise ValueError(f"template ends inside a block (expected {stop})")
    return nodes, i


def _operand(words, env):
    word = words.pop(0)
    if word == "(":
        value = _command(words, env)
        assert words.pop(0) == ")"
        return value
    if word.startswith('"'):
        return json.loads(word)
    if word.isdigit():
        return int(word)
    if word.startswith("$."):
        return env["$"][word[2:]]
    if word.startswith("$"):
        return env[word]
    if word.startswith("."):
        return env["."][word[1:]]  # KeyError on a field the data does not have (Go: an execution error)
    raise ValueError(f"unsupported operand {word!r}")


def _command(words, env):
    if words[0] in _FUNCS:
        function, args = _FUNCS[words.pop(0)], []
        while words and words[0] != ")":
            args.append(_operand(words, env))
        return function(*args)
    return _operand(words, env)


def _evaluate(text, env):
    words = re.findall(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+', text)
    value = _command(words, env)
    assert not words, f"unparsed {words}"
    return value


def _execute(nodes, env) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_evaluate(node[1], env)))
        elif node[0] == "if":
            out.append(_execute(node[2] if _evaluate(node[1], env) else node[3], env))
        else:  # range [$index, $element :=] pipeline
            names, _, pipeline = node[1].rpartition(":=")
            names = [n.strip() for n in names.split(",") if n.strip()]
            for index, item in enumerate(_evaluate(pipeline, env)):
                bound = dict(zip(names, [index, item][-len(names) :], strict=True)) if names else {}
                out.append(_execute(node[2], {**env, **bound, ".": item}))
    return "".join(out)


def go_render(template: str, data: dict) -> str:
    nodes, _ = _parse(_tokens(template))
    return _execute(nodes, {".": data, "$": data})


def ollama_render(template: str, messages: list[dict], system: str | None = None) -> str:
    """The prompt Ollama builds for a chat request with this TEMPLATE (and Modelfile SYSTEM).

    As Ollama's server does (server/routes.go, template/template.go): a Modelfile SYSTEM becomes a
    first system message unless the request starts with one; the template gets `.Messages` (system
    messages stay in it) and `.System`, every system content joined. The conversations here alternate
    roles, so Ollama's merging of consecutive same-role messages does not apply.
    """
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    turns = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    system_text = "\n\n".join(t["Content"] for t in turns if t["Role"] == "system")
    return go_render(template, {"Messages": turns, "System": system_text, "Response": "", "Tools": None})


def _block(modelfile_text: str, instruction: str) -> str:
    found = re.search(rf'^{instruction} """(.*?)"""$', modelfile_text, re.S | re.M)
    assert found, f"no {instruction} block"
    return found.group(1)


CONVERSATIONS = {
    "system+user+assistant+user": [
        {"role": "system", "content": "Reply with one call."},
        {"role": "user", "content": "kitchen lights off"},
        {"role": "assistant", "content": 'lights("kitchen", 0)'},
        {"role": "user", "content": "and a timer\nfor 5 min"},
    ],
    "user+assistant+user, no system": [
        {"role": "user", "content": "kitchen lights off"},
        {"role": "assistant", "content": 'lights("kitchen", 0)'},
        {"role": "user", "content": "timer 5 min please"},
    ],
    "one user message": [{"role": "user", "content": "heat the bedroom to 19"}],
}


class _WithTemplate:
    """The tokenizer rendering another Jinja chat template (apply_chat_template's chat_template argument)."""

    def __init__(self, tokenizer, chat_template):
        self.tokenizer, self.chat_template, self.eos_token = tokenizer, chat_template, tokenizer.eos_token

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)


def test_go_renderer_follows_text_templates_documented_rules():
    assert go_render("{{23 -}} < {{- 45}}", {}) == "23<45"  # the trim example in text/template's docs
    data = {"Messages": [{"Role": "a"}, {"Role": "b"}]}
    loop = "{{- range $i, $_ := .Messages }}{{ if eq $i 0 }}[{{ else }},{{ end }}{{ .Role }}{{ end }}]"
    assert go_render(loop, data) == "[a,b]"
    assert go_render('{{ if and (eq 1 1) (ne "x" "x") }}yes{{ else }}no{{ end }}', {}) == "no"
    with pytest.raises(KeyError):
        go_render(
            "{{ .content }}", {"content": None} and {"Content": "x"}
        )  # Go field names are case-sensitive


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ollama_template_renders_byte_for_byte_as_the_chat_template(tokenizer, name):
    messages = CONVERSATIONS[name]
    want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ollama_render(export.ollama_template(tokenizer), messages) == want


def test_modelfile_system_renders_as_the_chat_templates_system_message(tokenizer):
    text = export.modelfile("model-f16.gguf", tokenizer, system="Reply with one call.")
    template, system = _block(text, "TEMPLATE"), _block(text, "SYSTEM")
    assert system == "Reply with one call."
    for messages in CONVERSATIONS.values():
        sent = (
            messages
            if messages[0]["role"] == "system"
            else [{"role": "system", "content": system}, *messages]
        )
        want = tokenizer.apply_chat_template(sent, tokenize=False, add_generation_prompt=True)
        assert ollama_render(template, messages, system=system) == want


def test_a_template_off_by_one_newline_fails_the_comparison(tokenizer):
    """Counter-examples: the byte comparison catches a dropped newline and a dropped default system prompt."""
    template, pieces = export.ollama_template(tokenizer), export.chat_template_pieces(tokenizer)
    no_newline = template.replace("{{ .Content }}<|im_end|>\n", "{{ .Content }}<|im_end|>")
    no_default = template.replace(pieces["default_system"], "")
    assert no_newline != template and no_default != template
    for name, messages in CONVERSATIONS.items():
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(no_newline, messages) != want
        assert (ollama_render(no_default, messages) == want) == (messages[0]["role"] == "system"), name


def test_template_pieces_are_read_off_the_chat_template_not_assumed(tokenizer):
    pieces = export.chat_template_pieces(tokenizer)
    assert pieces["head"] == "<|im_start|>" and pieces["mid"] == "\n" and pieces["suffix"] == "<|im_end|>\n"
    assert pieces["generation"] == "<|im_start|>assistant\n"
    assert pieces["default_system"].startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    # another head + role + mid layout (Zephyr's) is derived from its own markers and renders the same
    zephyr = _WithTemplate(
        tokenizer,
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    )
    assert export.chat_template_pieces(zephyr)["default_system"] == ""
    for messages in CONVERSATIONS.values():
        want = zephyr.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(export.ollama_template(zephyr), messages) == want


def test_modelfile_has_from_template_and_stop_tokens(tokenizer):
    text = export.modelfile("model-f16.gguf", tokenizer, system="Reply with one call.")
    assert text.startswith("FROM ./model-f16.gguf\n")
    assert _block(text, "TEMPLATE").startswith("{{- range $i, $_ := .Messages }}")
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops == ["<|im_end|>", "<|im_start|>"]  # the turn's end (also eos), and the next turn's start
    assert 'SYSTEM """Reply with one call."""' in text
    assert "SYSTEM" not in export.modelfile("m.gguf", tokenizer)
    with pytest.raises(ValueError, match='"""'):
        export.modelfile("m.gguf", tokenizer, system='say """hi"""')


@pytest.mark.parametrize(
    "chat_template",
    [
        # Llama 2: no role names in the markers
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}",
        # Llama 3: a begin-of-text token before the first turn only
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        # ChatML that drops the system message
        "{% for m in messages if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}",
    ],
    ids=["llama2", "llama3-bos", "drops-system"],
)
def test_modelfile_refuses_a_chat_template_it_cannot_express(tokenizer, chat_template):
    with pytest.raises(ValueError, match="ChatML-style"):
        export.modelfile("m.gguf", _WithTemplate(tokenizer, chat_template))
    with pytest.raises(ValueError, match="no chat template"):
        export.modelfile("m.gguf", _WithTemplate(tokenizer, None))


def test_modelfile_refuses_template_text_that_go_would_read_as_an_action(tokenizer):
    chatml_with_braces = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nUse {{ braces }}<|im_end|>\\n' }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="escaping"):
        export.modelfile("m.gguf", _WithTemplate(tokenizer, chatml_with_braces))
