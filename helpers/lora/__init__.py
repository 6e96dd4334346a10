"""LoRA (exercise 7.4): low-rank adapters on GPT-2's linears, merging, adapter files."""
