"""Planted token-gradient conflict: a task whose conflicting (token, expert) pairs are known by
construction, trained with the real STGC callback, to tell whether choosing tokens by their gradients
finds those pairs and whether rerouting them helps (docs/planted.md)."""
