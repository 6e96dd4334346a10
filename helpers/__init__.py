"""Instruction fine-tuning a GPT model: the course's data, model, training and evaluation code."""
