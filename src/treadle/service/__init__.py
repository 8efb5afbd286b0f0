"""The brain: sessions, futures, ordering and the training/sampling services.
asyncio-facing, no HTTP; compute is handed to the engine threads."""
