"""Worker entry points that torchrun starts (`python -m course.workers.<name>`), and what they share.

They live in the repository, not in strings a notebook writes out: a learner can read them,
run them by hand with torchrun, and the tests run exactly the code the notebook runs.
"""
