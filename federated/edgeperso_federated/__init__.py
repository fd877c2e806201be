"""Coordinator for EdgePerso federated rounds (server side)."""

__all__: list[str] = []
