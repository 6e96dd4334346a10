"""Temporary: the two names other modules still import from here, until they switch.

`helpers.evaluate` was split by concern: response files and `entry_id` are in
`helpers.responses`, offline metrics and `compare_runs` in `helpers.metrics`,
`generate_test_responses` in `helpers.generate`, `plot_comparison` in `helpers.plots`.
Delete this module once helpers/finetune.py and tests/test_finetune.py import from there.
"""

from helpers.generate import generate_test_responses
from helpers.responses import load_responses

__all__ = ["generate_test_responses", "load_responses"]
