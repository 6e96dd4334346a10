"""Instruction fine-tuning a GPT model: the course's data, model, training and evaluation code.

Import from the module that owns a concept, as the notebooks do, e.g.
`from helpers.batching import collate_fn` or `from helpers.train import train`.
The README's layout section lists the modules.
"""
