"""Pydantic models of the REST contract: the API <-> worker contract (DESIGN §3–§4)."""
