"""Shared test set-up: a fixed seed for every test, and the gpu marker skipped on CPU."""

import pytest
import torch

import course


@pytest.fixture(autouse=True)
def _seed():
    course.env.seed_everything(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (its chat template is what the tasks are formatted with)."""
    return course.models.load_tokenizer()
