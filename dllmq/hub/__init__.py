"""Publishing dllmq checkpoints to the Hugging Face Hub.

`push.py` validates a checkpoint folder and uploads it; `card.py` writes the model card (README.md)
that goes with it. Both import huggingface_hub, so this package is only imported by `dllmq push`.
"""
