"""The HTTP face: FastAPI routers, one per SDK resource, and the wire codecs."""
