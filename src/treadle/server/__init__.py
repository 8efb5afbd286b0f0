"""The HTTP face: FastAPI routers, one per SDK resource, and the wire codecs. It imports
the service and the torch-free shared modules (settings, types, errors) only."""
