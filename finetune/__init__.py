"""LoRA fine-tuning of the page model (``homepage finetune CONFIG``).

- ``finetune.store``: the logs split in time; stores that hold only what a model may see;
- ``finetune.examples``: SFT examples rendered with the production prompts, retrieval and pools;
- ``finetune.train``: peft LoRA with the transformers Trainer, checkpoints, resume, adapter metadata;
- ``finetune.merge``: the adapter folded into the base weights.
Serving loads an adapter through the ``adapter`` setting; ``homepage eval adapter`` measures it.
"""
