"""Structured outputs: constrain what a request may generate to a JSON schema, any JSON object,
a regex, a list of choices or an EBNF grammar.

    params.py    StructuredOutputsParams: the constraint, as the request states it
    grammar.py   GrammarCompiler (xgrammar, cached by constraint) and GrammarState (one matcher
                 per sequence, fed each accepted token, asked for the next token mask)

The mask itself is applied inside the batched sampler (runner/sampler.py, ops/bitmask.py),
to the constrained rows only.
"""
from nanovllm.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
