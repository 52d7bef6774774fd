"""Lua scripts of the rate limiter, loaded with importlib.resources."""
