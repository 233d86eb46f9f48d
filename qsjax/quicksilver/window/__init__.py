"""The QuickSilver pass over causal windows: `state` (the named state it carries), `step` (one layer:
the block for the computing tokens, then the decisions), `forward` (the pass: plain layers below the
first decision, then steps), `rows` (bucketed row compaction with static shapes), and `scoring`
(a window's NLL under QuickSilver)."""
