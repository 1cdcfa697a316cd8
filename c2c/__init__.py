"""Cache-to-Cache (C2C): fuse a sharer LLM's KV-cache into a receiver LLM's cache."""
