"""Monitoring: the live dashboard of the fleet and the product owner's approval page (FastAPI, port 8080)."""
