"""Corpora, recommendation logs and (in `synthetic`) probing-task generators."""

from prism_jax.data.rec import (Interactions, RecSplit, SequenceSampler, k_core, leave_one_out,
                                left_pad, read_interactions, synthetic_log)
from prism_jax.data.text import (TextCorpus, WindowSampler, eval_windows, load_text_corpus,
                                 stdlib_corpus, unigram_bits)

__all__ = [
    "Interactions", "RecSplit", "SequenceSampler", "TextCorpus", "WindowSampler", "eval_windows",
    "k_core", "leave_one_out", "left_pad", "load_text_corpus", "read_interactions",
    "stdlib_corpus", "synthetic_log", "unigram_bits",
]
