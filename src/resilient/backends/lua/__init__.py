"""Lua shared by the scripts of several blocks."""
