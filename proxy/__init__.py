"""Frugal: an OpenAI-compatible proxy that makes LLM inference cheaper."""
