"""Local attention for far context: a context token far from the end of its prompt attends only to
the sinks, the head of the prompt and the keys of the last W slots up to its own (StreamingLLM's
sinks + window, here only for tokens whose own predictions nobody needs).

For query i (slot s_i) and key j (slot s_j, position p_j) of a row whose eligible tokens are E:

    far_i      = i in E  and  i not among the last R tokens of E                  (R = local_full)
    anchor_j   = j not in E (the sinks; scored tokens come after every context token)  or  p_j < P
    visible_ij = (the layer's rule)  and  (not far_i  or  s_j > s_i - W  or  anchor_j)

W = local_window, P = local_prefix; "the layer's rule" is the causal one and, in a layer with its own
sliding window W_l (`attention.Rule`: Mistral, Gemma's local layers), s_j > s_i - W_l: a query sees
what both windows allow (an anchor outside W_l is not seen). The last R context tokens (among them
importance selection's voters and a prompt's question) and every token whose prediction is read
attend to the whole prompt (or their layer's window), so a needle far back is still found: its own keys and values need only its neighbours. The prefix
keeps a prompt's opening instruction in view of the far tokens: without it (P = 0) the default model
answers none of the 8,192-token passkey prompts, the needle just before the question included (our
reading: the far tokens then carry no trace of the task). With blockwise attention a far query block
visits the first key block (sinks and prefix, up to KEY_BLOCK slots) and ~W / KEY_BLOCK + 1 more,
instead of every block before it.
"""

from __future__ import annotations

import jax.numpy as jnp

from qsjax.dense.attention import Window
from qsjax.dense.model import Layout
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.mechanisms.selection import last_n

EVERY_SLOT = jnp.iinfo(jnp.int32).min


def window(qs: QuickSilverConfig, w: Layout, eligible) -> Window | None:
    """The rule as `qsjax.dense.attention.attention` takes it (the same in every layer: `Context.local`), or
    None when local attention is off: a far query sees keys from slot s_i - W + 1 on, the others every
    slot; the anchors are the real tokens that are not eligible or lie in the prefix.  eligible [B, T]"""
    if qs.local_window is None:
        return None
    far = eligible & ~last_n(eligible, qs.local_full)
    anchor = w.valid & (~eligible | (w.positions < qs.local_prefix))
    return Window(jnp.where(far, w.slots - qs.local_window + 1, EVERY_SLOT), anchor)


def seen(visible, win: Window | None):
    """How many visible keys each query of a window (slots 0..T-1) sees up to its own slot, inside its
    local window.  visible [B, T] bool -> [B, T] int32"""
    upto = jnp.cumsum(visible, axis=-1)
    if win is None:
        return upto
    before = jnp.clip(win.q_from, 0, visible.shape[1]) - 1  # the last slot left out (-1: none)
    at = lambda a: jnp.take_along_axis(a, jnp.maximum(before, 0), axis=1)
    anchors = jnp.cumsum(visible & win.k_anchor, axis=-1)
    return jnp.where(before >= 0, upto - at(upto) + at(anchors), upto)
