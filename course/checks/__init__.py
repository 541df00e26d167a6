"""Graders for the notebooks' "Your turn" exercises.

Every grader has the same shape: `check_<exercise>(fn)` runs the learner's `fn` on
cases it generates itself, compares with the course's reference implementation and
either prints one line of praise or raises `AssertionError` with a hint that says what
went wrong on which input. A stub that still raises `NotImplementedError` fails with a
reminder instead of a traceback from deep inside the grader.

One module per part of the course; add a new part's graders in its own module and
import them here.
"""

from course.checks.compare import check_cheapest_method, check_memory_ratio
from course.checks.lora import (
    check_completion_labels,
    check_full_finetuning_bytes,
    check_lora_forward,
    check_lora_merge,
    check_lora_parameter_count,
    check_target_modules,
)
from course.checks.optim import check_quantize_state_block, check_state_bytes
from course.checks.qlora import check_qlora_bnb_config, check_qlora_targets
from course.checks.quant import check_bits_per_param, check_nf4_code, check_pack_nibbles, check_quantize_block
from course.checks.serving import check_route_requests
from course.checks.setup import check_exact_match
from course.checks.variants import check_group_pool, check_s2_shift

__all__ = [name for name in dir() if name.startswith("check_")]
