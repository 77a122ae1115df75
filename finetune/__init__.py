"""LoRA fine-tuning of the page model: SFT data built from logs with the production prompts and
retrieval, peft training, merging, adapter metadata. Not built yet: serving already loads any
adapter through the ``adapter`` setting (``agent.backends.hf.load_model``)."""
