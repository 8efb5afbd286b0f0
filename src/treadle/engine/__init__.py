"""The muscle: base models, LoRA adapters, losses, training and sampling. torch only;
no HTTP and no asyncio, so the service can run it on any thread or process."""
