"""The brain: sessions, futures, ordering and the training/sampling services.
asyncio-facing, no HTTP and no torch; compute is handed to each base model's engine
loop, which drives the engine through a worker (:mod:`treadle.service.served`)."""
