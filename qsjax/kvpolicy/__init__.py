"""KV-cache policies for the dense model: `eviction` holds the cache to a budget during generation
(StreamingLLM's sinks + recent window, H2O's heavy hitters)."""
