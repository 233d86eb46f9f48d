"""Running the model: compiled programs and the plumbing around them.

- `generator`: the Generator (compiled prefill and decode programs) and `generation_report`
- `programs`: one jitted function compiled ahead of time per key, compile time recorded
- `buckets`: static sizes, so that new input sizes do not trigger new compiles
- `compilecache`: JAX's persistent compilation cache
- `sharding`, `distributed`: devices on a mesh; several processes as one runtime
- `cli`: how every `python -m qsjax.*` command parses, fails (one `error:` line) and writes files"""
