"""Shipping a fine-tune: merge the adapter, save fp16 safetensors, write GGUF and an Ollama Modelfile.

A LoRA adapter needs peft at serving time; a merged model does not. Merging computes
W' = W + (alpha / r) B A once per layer (Hu et al. 2021, section 4.1: "no additional inference
latency"). For QLoRA the base weights are 4-bit: we *dequantize, then merge* (notebook 07),
so W is exactly the NF4-decoded weight the adapter was trained against, and the merged
model is dense. Re-quantizing after the merge would add a new rounding error on top.

GGUF is llama.cpp's single-file format (what Ollama runs, and what the embedded model came
in). `write_gguf` writes one with the `gguf` package: the model's hyper-parameters and its
tokenizer as key-value metadata, then every tensor under llama.cpp's name, in F16 or Q8_0
(blocks of 32 int8 values with one fp16 scale: 8.5 bits per weight). llama.cpp's converter
permutes the rows of q_proj and k_proj (its RoPE pairs dimensions (i, i+1), transformers'
pairs (i, i + d/2)); transformers' GGUF loader undoes that permutation when it reads the file,
so we apply it when we write (`permute_qk`).
"""

from pathlib import Path

import numpy as np
import torch

from course.kernel_path import check_not_repacked

GGUF_TYPES = ("F16", "Q8_0")
# transformers' Llama parameter name -> llama.cpp tensor name (gguf-py's TensorNameMap, llama part)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# --- merge --------------------------------------------------------------------------------


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight of a Linear or a bitsandbytes Linear4bit, as a dense fp32 tensor (out, in)."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bnb 4-bit: packed uint8 + absmax; decode to the values trained against
        import bitsandbytes as bnb

        check_not_repacked(layer, "decode this 4-bit weight")  # bitsandbytes' own inverse is inexact
        return bnb.functional.dequantize_4bit(weight.data, quant_state).view(quant_state.shape).float()
    if weight.dtype in (torch.int8, torch.uint8):
        raise TypeError(
            f"{type(layer).__name__} holds {weight.dtype} weights; only 4-bit and dense merge here"
        )
    return weight.detach().float()


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """State dict of the plain model that `peft_model` computes, with every LoRA update folded in.

    Dequantize-then-merge: W' = dequantize(W) + scaling * B @ A, in fp32, for every LoRA layer;
    other 4-bit layers are dequantized; all other parameters are copied.
    """
    from peft.tuners.lora import LoraLayer

    if not hasattr(peft_model, "get_base_model"):
        raise TypeError(f"expected a peft PeftModel, got {type(peft_model).__name__}")
    base = peft_model.get_base_model()
    state, done = {}, set()
    for name, module in base.named_modules():
        if any(name.startswith(prefix + ".") for prefix in done):
            continue  # lora_A / lora_B / base_layer of a layer merged below
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            weight = _dense_weight(layer)  # (out, in)
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).float()  # (out, in) = scaling * B @ A
            state[f"{name}.weight"] = weight
            if layer.bias is not None:
                state[f"{name}.bias"] = layer.bias.detach().float()
            done.add(name)
        elif getattr(getattr(module, "weight", None), "quant_state", None) is not None:
            state[f"{name}.weight"] = _dense_weight(module)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().float()
            done.add(name)
        else:
            for pname, param in module.named_parameters(recurse=False):
                state[f"{name}.{pname}" if name else pname] = param.detach().float()
    return state


def merge_adapter(peft_model, dtype: torch.dtype = torch.float32):
    """A plain transformers model (no peft, no bitsandbytes) equal to `peft_model`'s forward."""
    from transformers import AutoModelForCausalLM

    config = peft_model.get_base_model().config.__class__.from_dict(
        peft_model.get_base_model().config.to_dict()
    )
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the merged model is dense
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = merged_state_dict(peft_model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"merged weights do not fit the base architecture: missing {missing}, extra {unexpected}"
        )
    return model.to(dtype).eval()


def save_fp16(model, tokenizer, folder: str | Path) -> Path:
    """Save `model` (cast to fp16 in place) as safetensors plus its tokenizer: a folder plain transformers loads."""
    model.to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# --- GGUF ---------------------------------------------------------------------------------


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q_proj / k_proj: within each head, interleave the two halves.

    (out, in) -> (n_head, 2, d/2, in) -> (n_head, d/2, 2, in) -> (out, in). Worked example,
    one head of 4 rows [r0, r1, r2, r3] -> [r0, r2, r1, r3]. transformers' loader reverses it.
    """
    out = weight.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"{out} rows do not split into {n_head} heads of even size")
    w = weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:])  # (n_head, 2, d/2, in)
    return w.swapaxes(1, 2).reshape(weight.shape)  # (n_head, d/2, 2, in) -> (out, in)


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:-1]) in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
    raise ValueError(f"no GGUF name for {hf_name!r}: write_gguf handles Llama-architecture models only")


def _tokenizer_metadata(writer, tokenizer) -> None:
    """The BPE vocabulary, merges and special tokens, as llama.cpp's `gpt2` tokenizer model expects."""
    import json

    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"write_gguf writes byte-level BPE tokenizers, got {spec['model']['type']}")
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec["added_tokens"]}
    vocab.update({content: t["id"] for content, t in added.items()})
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    kind = {True: gguf.TokenType.CONTROL, False: gguf.TokenType.USER_DEFINED}  # added tokens: special or not
    types = [kind[added[t]["special"]] if t in added else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "smollm" in str(tokenizer.name_or_path).lower() else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token in (
        ("bos", tokenizer.bos_token),
        ("eos", tokenizer.eos_token),
        ("pad", tokenizer.pad_token),
    ):
        if token is not None:
            getattr(writer, f"add_{key}_token_id")(tokenizer.convert_tokens_to_ids(token))
    if tokenizer.unk_token is not None:
        writer.add_unk_token_id(tokenizer.convert_tokens_to_ids(tokenizer.unk_token))
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path: str | Path, gguf_type: str = "F16", name: str = "fine-tune") -> Path:
    """Write a Llama-architecture `model` and its tokenizer to one GGUF file.

    gguf_type: "F16" (2-D weights in fp16, norms in fp32, as llama.cpp's converter does) or
    "Q8_0" (2-D weights in blocks of 32 int8 values with one fp16 scale each).
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"write_gguf writes Llama-architecture models, got model_type={config.model_type!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "F16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, tokenizer)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd (no output.weight = tied, for transformers too)
        array = tensor.detach().float().cpu().numpy()  # (out, in) for weights
        if hf_name.endswith("q_proj.weight"):
            array = permute_qk(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_qk(array, config.num_key_value_heads)
        if array.ndim == 1:
            writer.add_tensor(gguf_name(hf_name), array.astype(np.float32))
        elif gguf_type == "F16":
            writer.add_tensor(gguf_name(hf_name), array.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """(model, tokenizer) read back with transformers' own GGUF loader (it dequantizes to `dtype`).

    with_tokenizer=False skips rebuilding the tokenizer from the file's metadata (seconds) and returns None for it.
    """
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    enabled, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    # transformers 5.24 reads GGUF tensors under a plain tqdm bar that ignores its progress-bar switch
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = (
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if with_tokenizer else None
        )
    finally:
        gguf_utils.tqdm = bar
        if enabled:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


# --- Ollama -------------------------------------------------------------------------------

# A probe conversation whose contents no chat template writes itself: where they land marks the turns.
PROBE = (
    ("system", "<<SYSTEM-PROBE>>"),
    ("user", "<<USER-PROBE-1>>"),
    ("assistant", "<<ASSISTANT-PROBE>>"),
    ("user", "<<USER-PROBE-2>>"),
)


def _not_chatml(why: str) -> ValueError:
    return ValueError(
        f"cannot write this chat template as an Ollama TEMPLATE: {why}. modelfile() writes ChatML-style"
        " templates only: every turn `head + role + mid + content + end`, as <|im_start|>user\\n...<|im_end|>\\n"
    )


def _split(text: str, marks: list[str]) -> list[str]:
    """The text around each mark, in order: `_split("aXbYc", ["X", "Y"]) -> ["a", "b", "c"]`."""
    pieces = []
    for mark in marks:
        before, found, text = text.partition(mark)
        if not found:
            raise _not_chatml(f"it dropped or rewrote the probe content {mark!r}")
        pieces.append(before)
    return [*pieces, text]


def chat_template_pieces(tokenizer) -> dict[str, str]:
    """The fixed text of a ChatML-style chat template, read off by rendering the probe conversation.

    A ChatML turn is `head + role + mid + content + suffix`. For SmolLM2: head "<|im_start|>",
    mid "\\n", suffix "<|im_end|>\\n", generation (what add_generation_prompt appends)
    "<|im_start|>assistant\\n", and default_system: the whole system turn the template inserts
    when the first message is not a system one. Any other structure is a ValueError.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template to derive the Ollama TEMPLATE from")
    messages = [{"role": role, "content": content} for role, content in PROBE]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # text = prefix(system) S | suffix prefix(user) U1 | suffix prefix(assistant) A | suffix prefix(user) U2 | suffix
    p_system, s_user, s_assistant, s_user_2, suffix = _split(text, [content for _, content in PROBE])
    if not (suffix and s_user.startswith(suffix) and s_assistant.startswith(suffix)):
        raise _not_chatml(f"its turns do not all end with the same text (the last ends {suffix!r})")
    prefixes = {"system": p_system, "user": s_user[len(suffix) :], "assistant": s_assistant[len(suffix) :]}
    head, found, mid = p_system.partition("system")
    if not found or s_user_2 != s_user or any(p != head + role + mid for role, p in prefixes.items()):
        raise _not_chatml(f"its turns start {prefixes}")
    if not with_prompt.startswith(text):
        raise _not_chatml("add_generation_prompt=True rewrites the conversation instead of appending to it")
    user, content = PROBE[1]
    only_user = tokenizer.apply_chat_template([{"role": user, "content": content}], tokenize=False)
    default_system, found, rest = only_user.partition(prefixes["user"] + content + suffix)
    if not found or rest:
        raise _not_chatml(f"a conversation without a system message renders as {only_user!r}")
    return {
        "head": head,
        "mid": mid,
        "suffix": suffix,
        "default_system": default_system,
        "generation": with_prompt[len(text) :],
    }


def ollama_template(tokenizer) -> str:
    """The tokenizer's chat template rewritten in Ollama's Go template syntax (the `.Messages` form).

    Ollama passes the whole conversation as `.Messages` (a Modelfile SYSTEM becomes a first system
    message) and renders once; `$i` is the message index, so `eq $i 0` is Jinja's `loop.first`.
    """
    return _go_template(chat_template_pieces(tokenizer))


def _go_template(pieces: dict[str, str]) -> str:
    for name, piece in pieces.items():  # "{{" would start a Go action, '"""' end the TEMPLATE block
        if "{{" in piece or '"""' in piece:
            raise ValueError(f"the chat template's {name} text {piece!r} would need escaping in a Modelfile")
    default = ""
    if pieces["default_system"]:  # inserted before the first message when that is not a system one
        default = '{{- if and (eq $i 0) (ne .Role "system") }}' + pieces["default_system"] + "{{ end }}"
    turn = pieces["head"] + "{{ .Role }}" + pieces["mid"] + "{{ .Content }}" + pieces["suffix"]
    return "{{- range $i, $_ := .Messages }}" + default + turn + "{{ end }}" + pieces["generation"]


def modelfile(gguf_file: str, tokenizer, system: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, the chat template in Ollama's Go syntax, stop tokens.

    Ollama does not run Jinja, so the template is derived: `chat_template_pieces` renders a probe
    conversation with the tokenizer's own template and reads off the ChatML markers, and the Go
    template is written from them; templates of another structure are refused rather than guessed.
    Without the turn's end marker (`<|im_end|>`) as a stop token the runtime keeps generating past the answer.
    """
    pieces = chat_template_pieces(tokenizer)
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{_go_template(pieces)}"""']
    if system is not None:
        if '"""' in system:
            raise ValueError(
                'the system prompt may not contain """ (it would end the Modelfile\'s SYSTEM block)'
            )
        lines.append(f'SYSTEM """{system}"""')
    for stop in dict.fromkeys([pieces["suffix"].strip(), tokenizer.eos_token, pieces["head"].strip()]):
        if stop:  # the end of a turn, the end of text, the start of a next turn the model should not write
            lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
