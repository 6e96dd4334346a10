"""Preference tuning with DPO (beyond chapter 7): preference pairs, the DPO loss, training against a frozen reference. `python -m helpers.dpo --help`."""
