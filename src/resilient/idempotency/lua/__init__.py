"""Lua scripts of the idempotency store, one per operation."""
