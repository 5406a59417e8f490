"""The constants of the sampler's counter-based random numbers, shared by the torch and Triton versions.

A sampled row draws its noise from hash(seed, step, token id): a 32-bit mixer
with these two multipliers, and a salt per hashed input. sampling.py (torch)
and sampling_triton.py (the GPU kernel) must use the same numbers, so they live
here, below both.
"""
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# A two-round 32-bit mixer with multipliers below 2**31, found by C. Wellons' hash-prospector
# (bias comparable to MurmurHash3's fmix32), and a salt per hashed input.
_MIX_C1 = 0x21F0AAAD
_MIX_C2 = 0x735A2D97
_SALT_SEED = 0x9E3779B9
_SALT_TOKEN = 0x7F4A7C15
