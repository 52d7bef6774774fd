"""Lua scripts of the cache store on Redis."""
