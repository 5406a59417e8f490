"""Structured outputs: constrain what a request may generate to a JSON schema, any JSON object,
a regex, a list of choices or an EBNF grammar.

    params.py    StructuredOutputsParams: the constraint, as the request states it
    grammar.py   GrammarCompiler (xgrammar, cached by constraint), GrammarState (the engine's
                 record of one sequence's grammar), MatcherState and MaskFiller (the matchers,
                 fed each accepted token and asked for the next token mask)
    grammar_process.py
                 the process that owns the matchers, and GrammarBitmask, the engine's end of it
                 (each step's tokens in and masks out through shared memory)

The mask itself is applied inside the batched sampler (runner/sampler.py, ops/bitmask.py),
to the constrained rows only.
"""
from nanovllm.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
