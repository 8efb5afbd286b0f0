"""One router per SDK resource; each route only decodes, calls the service, encodes."""
