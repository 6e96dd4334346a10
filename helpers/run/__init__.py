"""How a fine-tuning run is configured, checkpointed, resumed and summarised: the machinery around `helpers.train.train` and `python -m helpers.finetune`."""
