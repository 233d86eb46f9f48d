"""Speculative decoding, lossless: drafts verified by the model in one pass, the accepted prefix kept.

Reading order: `settings` (what runs), `lookup` (prompt lookup drafts), `drafting` (drafts from the
model's own layers), `search` and `store` (which of its sublayers to skip, chosen once per model and
kept beside it), `acceptance` (the verification rule), `adapt` (when drafting pays), `loop` (the
compiled decode loop).
"""
