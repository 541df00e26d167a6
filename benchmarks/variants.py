"""LoRA and its variants on one task and one budget: what each buys, with its noise.

    .venv/bin/python benchmarks/variants.py [--runs "LoRA r=8,DoRA r=8"] [--steps 20] [--batch-size 4]

Every run adapts the same layers of SmolLM2-135M (every linear layer of decoder layers
20-29), trains with AdamW at one learning rate (linear decay) on the same batches of
event_extraction, and is measured the same way: answer-token loss on a fixed validation
subset every few steps (the curves), teacher-forced exact match on the first `--test-n`
test examples with a 95% Wilson interval (course.stats), median seconds per step, and
trainable parameters. Variants: LoRA, rsLoRA (alpha / sqrt(r)), DoRA, PiSSA init (peft),
LoftQ init on an NF4 base (course.loftq, peft's needs CUDA), LoRA+ (peft's
`create_loraplus_optimizer`, B's learning rate 16x), QA-LoRA on a group-wise INT4 base
(course.qalora) against plain LoRA on that base, and LoRA vs rsLoRA at r = 64.

A CPU economy that changes no number: layers 0-19 carry no adapter and are frozen, so their
output for a given example is the same in every run. It is computed once per example
(`hidden_states[20]`) and each run trains and evaluates layers 20-29 from it
(`upper_layers_only`); a check at start-up asserts that this gives the full model's logits.

Writes benchmarks/results/variants.json and variants.md; `--runs` merges a subset into the
existing file, so the benchmark can be run in pieces.
"""

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from datetime import date
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging as hf_logging

import course
from course.data import IGNORE_INDEX, collate, tokenize_for_training
from course.loftq import loftq_init
from course.qalora import add_qalora, quantize_layers_groupwise
from course.stats import Rate, tie

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH, MD_PATH = RESULTS / "variants.json", RESULTS / "variants.md"
FIRST = 20  # the first adapted decoder layer; 0..19 stay frozen and adapter-free
TARGETS = r"model\.layers\.(2[0-9])\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ALPHA, LR, LORAPLUS_RATIO, GROUP_SIZE = 16, 2e-3, 16, 32  # LoRA+ paper: ratio 2^4 as a default
BASELINE = "LoRA r=8"

RUNS = {  # name (no commas: --runs splits on them) -> how to build it; "lr_mult" multiplies the shared lr
    "LoRA r=8": dict(kind="peft", r=8),
    "rsLoRA r=8": dict(kind="peft", r=8, use_rslora=True),
    "DoRA r=8": dict(kind="peft", r=8, use_dora=True),
    "PiSSA r=8": dict(kind="peft", r=8, init_lora_weights="pissa"),
    "LoRA+ r=8": dict(kind="loraplus", r=8),
    "LoftQ r=8 (NF4 base)": dict(kind="loftq", r=8),
    "LoRA r=8 (INT4 base)": dict(kind="int4_lora", r=8),
    "QA-LoRA r=8 (INT4 base)": dict(kind="qalora", r=8),
    "QA-LoRA r=16 (INT4 base)": dict(kind="qalora", r=16),
    "QA-LoRA r=8 lr x8 (INT4 base)": dict(kind="qalora", r=8, lr_mult=8),
    "LoRA r=64": dict(kind="peft", r=64),
    "rsLoRA r=64": dict(kind="peft", r=64, use_rslora=True),
}


def inner_model(model):
    """The LlamaModel inside a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


@contextlib.contextmanager
def upper_layers_only(model, first: int = FIRST):
    """Run only decoder layers first.. of `model`: feed it `inputs_embeds` = hidden_states[first]."""
    inner = inner_model(model)
    layers = inner.layers
    inner.layers = nn.ModuleList(list(layers)[first:])
    try:
        yield model
    finally:
        inner.layers = layers


class Cache:
    """Tokenized examples and their hidden states at the input of layer FIRST, computed once."""

    def __init__(self, model, tokenizer, examples, batch_size: int = 16):
        self.items = [tokenize_for_training(tokenizer, ex) for ex in examples]
        self.pad_id = tokenizer.pad_token_id
        self.hidden = []
        with torch.no_grad():
            for start in range(0, len(self.items), batch_size):
                chunk = self.items[start : start + batch_size]
                batch = collate(chunk, self.pad_id)
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                    logits_to_keep=1,
                )
                h = out.hidden_states[FIRST]  # (B, T, hidden): the input of layer FIRST
                self.hidden += [h[i, : len(item["input_ids"])].clone() for i, item in enumerate(chunk)]

    def batch(self, indices):
        rows = [self.items[i] for i in indices]
        batch = collate(rows, self.pad_id)  # (B, T) right-padded input_ids, attention_mask, labels
        T = batch["input_ids"].shape[1]
        hidden = torch.zeros(len(rows), T, self.hidden[0].shape[-1])  # (B, T, hidden)
        for j, i in enumerate(indices):
            hidden[j, : len(self.hidden[i])] = self.hidden[i]
        batch["hidden"] = hidden
        return batch


def answer_logits(model, batch):
    """(answer tokens, V) logits and their targets, from the cached hidden states."""
    targets = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    scored = targets != IGNORE_INDEX
    keep = nn.functional.pad(scored, (0, 1))  # (B, T)
    with upper_layers_only(model):
        logits = model(
            inputs_embeds=batch["hidden"], attention_mask=batch["attention_mask"], logits_to_keep=keep
        ).logits  # (answer tokens, V)
    return logits.float(), targets[scored], scored


@torch.no_grad()
def evaluate(model, cache: Cache, batch_size: int = 20):
    """(mean answer-token loss, exact-match count): an example counts when every answer token is the argmax."""
    model.eval()
    total, tokens, hits = 0.0, 0, 0
    for start in range(0, len(cache.items), batch_size):
        batch = cache.batch(range(start, min(start + batch_size, len(cache.items))))
        logits, targets, scored = answer_logits(model, batch)
        total += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        tokens += len(targets)
        wrong = torch.zeros_like(scored)
        wrong[scored] = logits.argmax(-1) != targets  # (B, T-1) True where an answer token is wrong
        hits += int((~wrong.any(-1)).sum())
    return total / tokens, hits


def build(name: str, spec: dict, model):
    """(model with the variant's adapters, optimizer factory, learning rate) for one run."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    r, kind, lr = spec["r"], spec["kind"], LR * spec.get("lr_mult", 1)
    candidate = copy.deepcopy(model)
    extra = {k: v for k, v in spec.items() if k not in ("kind", "r", "lr_mult")}
    if kind == "qalora":
        add_qalora(candidate, TARGETS, r=r, alpha=ALPHA, group_size=GROUP_SIZE)
        return candidate, None, lr
    if kind == "int4_lora":
        quantize_layers_groupwise(candidate, TARGETS, group_size=GROUP_SIZE)
        course.lora.add_lora(candidate, TARGETS, r=r, alpha=ALPHA)
        return candidate, None, lr
    config = LoraConfig(r=r, lora_alpha=ALPHA, target_modules=TARGETS, **extra)
    if kind == "loftq":  # the NF4 base: Q in fp32 is what bitsandbytes' Linear4bit computes with on CPU
        fits = {}
        for target in course.lora.find_target_modules(candidate, TARGETS):
            layer = candidate.get_submodule(target)
            Q, A, B = loftq_init(layer.weight, r=r)
            layer.weight.data = Q
            fits[target] = (A, B)
        candidate = get_peft_model(candidate, config)
        for target, (A, B) in fits.items():
            layer = candidate.base_model.model.get_submodule(target)
            layer.lora_A["default"].weight.data = A
            layer.lora_B["default"].weight.data = B / layer.scaling["default"]  # scaling * B A = the fit
        return candidate, None, lr
    candidate = get_peft_model(candidate, config)
    if kind == "loraplus":

        def factory(params, candidate=candidate):
            return create_loraplus_optimizer(
                candidate, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=LORAPLUS_RATIO
            )

        return candidate, factory, lr
    return candidate, None, lr


def train_run(name, spec, model, tokenizer, train: Cache, val: Cache, test: Cache, args) -> dict:
    candidate, factory, lr = build(name, spec, model)
    params = [p for p in candidate.parameters() if p.requires_grad]
    opt = factory(params) if factory else torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / args.steps)
    generator = torch.Generator().manual_seed(0)  # the same batches for every run
    order = torch.randperm(len(train.items), generator=generator).tolist()
    val_steps, val_loss = [0], [evaluate(candidate, val)[0]]
    losses, seconds = [], []
    for step in range(1, args.steps + 1):
        batch = train.batch(order[(step - 1) * args.batch_size : step * args.batch_size])
        candidate.train()
        start = time.perf_counter()
        logits, targets, _ = answer_logits(candidate, batch)
        loss = nn.functional.cross_entropy(logits, targets)
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            val_steps.append(step)
            val_loss.append(evaluate(candidate, val)[0])
    _, hits = evaluate(candidate, test)
    row = {
        "trainable": sum(p.numel() for p in params),
        "lr": lr,
        "train_loss": [round(x, 4) for x in losses],
        "val_steps": val_steps,
        "val_loss": [round(x, 4) for x in val_loss],
        "exact": hits,
        "n": len(test.items),
        "s_per_step": round(statistics.median(seconds), 3),
    }
    print(
        f"{name:32s} val loss {val_loss[0]:.3f} -> {val_loss[-1]:.3f}  exact {Rate(hits, row['n'])}  "
        f"{row['s_per_step']:.2f} s/step",
        flush=True,
    )
    if name == BASELINE and args.greedy_check:  # once: teacher forcing against real greedy generation
        subset = course.data.load_task("event_extraction", "test").select(range(args.test_n))
        greedy = course.train.evaluate_exact_match(candidate, tokenizer, subset, batch_size=20)
        row["greedy_exact"] = round(greedy.exact_match * args.test_n)
        print(f"   greedy generation: {Rate(row['greedy_exact'], args.test_n)}", flush=True)
    del candidate
    return row


def write_report(report: dict) -> None:
    runs = report["runs"]
    b = report["budget"]
    lines = [
        "# LoRA variants on one budget (benchmarks/variants.py)",
        "",
        f"SmolLM2-135M-Instruct, event_extraction. Every linear layer of decoder layers {FIRST}-29 adapted, "
        f"alpha = {ALPHA}, AdamW lr {LR} (linear decay), {b['steps']} steps x batch {b['batch_size']}; "
        f"validation loss on {b['val_n']} examples every {b['eval_every']} steps; exact match (teacher forced) "
        f"on the first {b['test_n']} test examples with 95% Wilson intervals. {report['machine']}, "
        f"{report['date']}, torch {report['torch']}, peft {report['peft']}.",
        "",
        f"| run | trainable | lr | s/step | val loss start -> end | exact match [95% CI] | vs {BASELINE} |",
        "|---|---|---|---|---|---|---|",
    ]
    base = runs.get(BASELINE)
    for name, row in runs.items():
        rate = Rate(row["exact"], row["n"])
        verdict = ""
        if base and name != BASELINE:
            verdict = (
                "tie"
                if tie(rate, Rate(base["exact"], base["n"]))
                else ("better" if rate.value > base["exact"] / base["n"] else "worse")
            )
        lines.append(
            f"| {name} | {row['trainable']:,} | {row['lr']:g} | {row['s_per_step']:.2f} | "
            f"{row['val_loss'][0]:.3f} -> {row['val_loss'][-1]:.3f} | {rate} | {verdict} |"
        )
    if base and "greedy_exact" in base:
        lines += [
            "",
            f"Check of the metric on {BASELINE}: teacher forcing {Rate(base['exact'], base['n'])}, "
            f"greedy generation {Rate(base['greedy_exact'], base['n'])}.",
        ]
    lines += [
        "",
        "'tie': Newcombe's 95% interval of the difference holds 0 (course.stats.tie). s/step is the "
        "median over the run on 2 shared cores; layers 0-19 are computed once per example, so a full "
        "step costs more, equally for every run.",
    ]
    MD_PATH.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--val-n", type=int, default=16)
    parser.add_argument("--test-n", type=int, default=100)
    parser.add_argument("--no-greedy-check", dest="greedy_check", action="store_false")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {list(RUNS)}")
    hf_logging.set_verbosity_error()
    course.env.seed_everything(0)
    start = time.perf_counter()
    model, tokenizer = course.models.load_model()
    model.requires_grad_(False)
    data = {s: course.data.load_task("event_extraction", s) for s in ("train", "validation", "test")}
    train = Cache(model, tokenizer, data["train"].select(range(args.steps * args.batch_size)))
    val = Cache(model, tokenizer, data["validation"].select(range(args.val_n)))
    test = Cache(model, tokenizer, data["test"].select(range(args.test_n)))
    probe = test.batch(range(4))
    with torch.no_grad():  # the shortcut is exact: layers FIRST.. from the cache give the full model's logits
        full = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        with upper_layers_only(model):
            upper = model(inputs_embeds=probe["hidden"], attention_mask=probe["attention_mask"]).logits
    real = probe["attention_mask"].bool()
    gap = (full[real] - upper[real]).abs().max().item()
    assert gap < 1e-4, gap
    print(
        f"cache built in {time.perf_counter() - start:.0f} s; upper layers from the cache vs full model: "
        f"max |logit diff| {gap:.1e}",
        flush=True,
    )
    report = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"runs": {}}
    budget = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "val_n": args.val_n,
        "test_n": args.test_n,
    }
    if report.get("budget", budget) != budget:
        report["runs"] = {}  # another budget: the old rows are not comparable
    report.update(
        machine=f"{platform.machine()} CPU x{torch.get_num_threads()} threads"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        date=str(date.today()),
        torch=torch.__version__,
        peft=metadata.version("peft"),
        budget=budget,
        alpha=ALPHA,
        lr=LR,
        first_layer=FIRST,
        loraplus_ratio=LORAPLUS_RATIO,
        group_size=GROUP_SIZE,
    )
    for name in names:
        report["runs"][name] = train_run(name, RUNS[name], model, tokenizer, train, val, test, args)
        report["runs"] = {n: report["runs"][n] for n in RUNS if n in report["runs"]}  # the table's order
        RESULTS.mkdir(exist_ok=True)
        JSON_PATH.write_text(json.dumps(report, indent=1) + "\n")
        write_report(report)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
