"""One call that differs between transformers releases the project runs on.

A decoder's KV cache is the keyword `cache` (and the output field `.cache`) in transformers 5.24,
which requirements.txt pins, and `past_key_values` in earlier 5.x releases (5.17 is on the GPU
machines this project is checked on). `run_decoder` passes and reads whichever this install has.
"""
import inspect

from transformers import LlamaModel

CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def run_decoder(decoder, cache=None, **inputs):
    """decoder(**inputs) with the KV cache `cache` (None: no cache) -> (last hidden state, cache)."""
    out = decoder(**inputs, **{CACHE: cache}, use_cache=cache is not None)
    return out.last_hidden_state, getattr(out, CACHE)
