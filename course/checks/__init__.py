"""Graders for the notebooks' "Your turn" exercises.

Every grader has the same shape: `check_<exercise>(fn)` runs the learner's `fn` on
cases it generates itself, compares with the course's reference implementation and
either prints one line of praise or raises `AssertionError` with a hint that says what
went wrong on which input. A stub that still raises `NotImplementedError` fails with a
reminder instead of a traceback from deep inside the grader.

One module per part of the course; add a new part's graders in its own module and
import them here.
"""

from course.checks.beyond_lora import check_group_pool, check_s2_shift
from course.checks.compare import check_best_within_memory, check_examples_needed
from course.checks.double_quant import check_dequantize_absmax, check_smallest_blocksize
from course.checks.families import check_ia3_merge, check_prefix_parameter_count
from course.checks.lora import (
    check_choose_rank,
    check_completion_labels,
    check_full_finetuning_bytes,
    check_lora_forward,
    check_lora_merge,
    check_lora_parameter_count,
    check_lora_training_bytes,
    check_target_modules,
)
from course.checks.optim import check_pages_to_evict, check_state_bytes
from course.checks.practice import check_early_stop, check_find_leaks
from course.checks.qlora import check_qlora_bnb_config, check_qlora_targets
from course.checks.quant import (
    check_bits_per_param,
    check_max_code_error,
    check_nf4_code,
    check_pack_nibbles,
    check_quantize_block,
)
from course.checks.scaling import check_rank_indices, check_zero_bytes
from course.checks.serving import check_mixed_lora_delta, check_route_requests
from course.checks.setup import check_exact_match, check_field_accuracy

__all__ = [name for name in dir() if name.startswith("check_")]
