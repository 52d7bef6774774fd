"""Lua scripts of the shared circuit-breaker state."""
