"""Lua scripts of the retry budget shared through Redis."""
