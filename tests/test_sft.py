"""course.sft against TRL 1.16's SFTTrainer: same labels, end-of-turn inside the loss, same first loss."""

import json
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

import course
from course import sft, userdata
from course.data import IGNORE_INDEX

ROWS = [
    {"prompt": "turn the office lights off", "completion": 'lights(room="office", level=0)'},
    {"prompt": "timer 5 min", "completion": "timer(minutes=5)"},
    {"prompt": "heat the kitchen to 21C", "completion": 'heat(room="kitchen", celsius=21)'},
    {"prompt": "Set the bedroom lights to 30 percent", "completion": 'lights(room="bedroom", level=30)'},
]


def _examples(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return userdata.load_user_data(path, system="Reply with one call.").examples


def _trainer(tmp_path, tokenizer, max_length=128, **overrides):
    from trl import SFTTrainer

    dataset = Dataset.from_list([userdata.to_trl(e) for e in _examples(tmp_path)])
    config = sft.sft_config(
        tmp_path / "out",
        max_length=max_length,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        max_steps=1,
        logging_steps=1,
        seed=0,
        **overrides,
    )
    with warnings.catch_warnings():  # peft 0.21.2 reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        return SFTTrainer(
            model=course.models.tiny_model(),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )


def test_tokenize_chat_equals_trl_and_trains_the_end_of_turn(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example, row in zip(_examples(tmp_path), trainer.train_dataset, strict=True):
        ours = sft.tokenize_chat(tokenizer, example["messages"])
        assert ours["input_ids"] == row["input_ids"] and ours["labels"] == row["labels"]
        _, trained = sft.trained_text(tokenizer, row["input_ids"], row["labels"])
        assert trained == example["messages"][-1]["content"] + "<|im_end|>\n"
        assert end_of_turn in [t for t in row["labels"] if t != IGNORE_INDEX]


def test_a_short_max_length_cuts_the_end_of_turn_out_of_the_loss(tmp_path, tokenizer):
    """Counter-example for the check above: TRL truncates from the end, so a cut answer never learns to stop."""
    trainer = _trainer(tmp_path, tokenizer, max_length=28)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = list(trainer.train_dataset)
    assert rows and all(len(r["input_ids"]) == 28 for r in rows)
    assert not any(end_of_turn in [t for t in r["labels"] if t != IGNORE_INDEX] for r in rows)


def test_first_step_loss_of_sfttrainer_equals_course_answer_loss(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer)
    theirs, ours = sft.first_step_losses(trainer)
    assert theirs == pytest.approx(ours, rel=1e-6)  # same terms, same mean; only the summation order differs
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(ours, rel=1e-5)  # the loss training actually used at step 1


def test_sft_config_on_cpu_and_the_default_that_refuses_it(tmp_path):
    from trl import SFTConfig

    config = sft.sft_config(tmp_path, max_length=64, learning_rate=2e-4)
    assert (config.bf16, config.use_cpu, config.completion_only_loss, config.packing) == (
        False,
        True,
        True,
        False,
    )
    assert config.max_length == 64 and config.learning_rate == 2e-4
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16"):
            SFTConfig(output_dir=str(tmp_path))  # TRL's default bf16=True on a CPU


def test_loss_curves_read_trainer_logs():
    history = [
        {"loss": 2.0, "step": 1},
        {"eval_loss": 1.5, "step": 2},
        {"loss": 1.0, "step": 2},
        {"train_loss": 1.5, "step": 2},
    ]
    assert sft.loss_curves(history) == {"train": ([1, 2], [2.0, 1.0]), "validation": ([2], [1.5])}


def test_text_perplexity_is_exp_of_the_models_own_loss(tokenizer):
    model = course.models.tiny_model()
    line = "Water boils at one hundred degrees Celsius at sea level."
    ids = torch.tensor([tokenizer(line, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = torch.exp(model(input_ids=ids, labels=ids).loss).item()
    assert sft.text_perplexity(model, tokenizer, [line]) == pytest.approx(want, rel=1e-5)
