"""The paged KV-cache allocator.

The KV cache is a pool of `num_blocks` blocks of `block_size` token slots. A
sequence owns a list of block ids, its block table; token i lives in block
`block_table[i // block_size]`. Blocks are handed out one at a time as a
sequence grows (paging), so memory is only ever wasted in the unfilled tail of
each sequence's last block, never reserved for tokens that may not come.

Prefix caching. A full block of computed tokens is immutable, so it can be
shared. Each full block gets a chain hash, sha256(hash of the previous block,
this block's token ids): equal hashes mean equal prefixes up to and including
this block, so two requests that start with the same system prompt find its
blocks by hash and share them (reference counts say how many sequences use a
block). A cryptographic hash makes the chain unforgeable; the token ids are
stored beside it and compared on every hit all the same. When the last user
frees a hashed block it is not forgotten: it joins an LRU list and stays
findable until a new allocation needs it (eviction). Only full blocks are
shared, so nothing is ever written into a shared block: no copy-on-write.

The `naive` policy reserves `max_model_len` slots for every sequence when it is
admitted, as servers did before paging; the visualizer compares the two.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Sequence as SequenceOf

from nanovllm.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None                 # set while the block is findable in the prefix cache
    token_ids: tuple[int, ...] | None = None        # the hashed tokens, to rule out collisions


@dataclass
class KVCacheUsage:
    """Where the pool's slots are. used + fragmentation + free == num_blocks * block_size."""
    num_blocks: int
    block_size: int
    used_slots: int              # slots holding a computed token of a live sequence (shared blocks once)
    fragmentation_slots: int     # slots of live blocks holding nothing: last-block tails, naive reservations
    free_slots: int              # slots of free blocks, cached or not
    free_blocks: int             # blocks with no user (including cached_free_blocks)
    cached_free_blocks: int      # free blocks still findable by hash (evicted on demand, LRU)
    prefix_cache_queries: int    # tokens looked up at admission
    prefix_cache_hits: int       # of those, tokens found in the cache

    @property
    def total_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


def hash_block_tokens(parent_hash: bytes | None, token_ids: SequenceOf[int]) -> bytes:
    """The chain hash of a full block: sha256(parent's hash, token ids)."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 policy: str = "paged", max_model_len: int | None = None):
        if policy not in ("paged", "naive"):
            raise ValueError(f"policy must be 'paged' or 'naive', got {policy!r}")
        if policy == "naive" and max_model_len is None:
            raise ValueError("the naive policy reserves max_model_len slots per sequence: pass max_model_len")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.policy = policy
        # Blocks reserved per sequence under the naive policy.
        self.num_reserved_blocks = -(-max_model_len // block_size) if policy == "naive" else 0
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))       # no user, no hash
        self.cached_free_block_ids: OrderedDict[int, None] = OrderedDict()  # no user, hashed; LRU first
        self.cached_block_map: dict[bytes, int] = {}                    # block hash -> block id
        self.owners: dict[int, Sequence] = {}                            # seq_id -> sequence holding blocks
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.cached_free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence holds to keep `num_tokens` tokens under this policy."""
        return max(-(-num_tokens // self.block_size), self.num_reserved_blocks)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq's tokens, in order.

        Never the whole sequence: its last token is left to compute, for the logits.
        """
        if not self.enable_prefix_caching:
            return []
        num_full_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(seq, num_full_blocks)
        block_ids = []
        for i in range(num_full_blocks):
            block_id = self.cached_block_map.get(hashes[i])
            if block_id is None:
                break
            start = i * self.block_size
            if self.blocks[block_id].token_ids != tuple(seq.token_ids[start:start + self.block_size]):
                break
            block_ids.append(block_id)
        return block_ids

    # ---- allocation ----------------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_tokens: int, shared_block_ids: SequenceOf[int] = ()) -> bool:
        """Grow seq's block table to hold its first `num_tokens` tokens; False (and no change) if the pool is short.

        `shared_block_ids` (only for a sequence with no blocks yet) are blocks of an
        identical prefix, computed already, that the sequence takes a reference to
        instead of new blocks.
        """
        table = seq.block_table
        if not shared_block_ids and num_tokens <= len(table) * self.block_size:
            return True   # the common decode step: its slot is in the last block already
        num_new = self.num_blocks_for(num_tokens) - len(table) - len(shared_block_ids)
        # Shared blocks with no user are counted as free now; taking them makes them used.
        num_revived = sum(1 for b in shared_block_ids if self.blocks[b].ref_count == 0)
        if num_new > self.num_free_blocks - num_revived:
            return False
        for block_id in shared_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.cached_free_block_ids[block_id]
            block.ref_count += 1
            table.append(block_id)
        for _ in range(num_new):
            table.append(self._take_free_block())
        if table:
            self.owners[seq.seq_id] = seq
        return True

    def free(self, seq: Sequence) -> None:
        """Drop seq's references to its blocks. Hashed blocks stay findable until evicted."""
        # Tail first: a sequence's last blocks are the least likely to be shared, so evict them first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self.cached_free_block_ids[block_id] = None
                else:
                    self.free_block_ids.append(block_id)
        seq.block_table = []   # a new list: a table's identity lasts as long as its blocks (cuda_graph.py relies on it)
        seq.num_hashed_blocks = 0
        self.owners.pop(seq.seq_id, None)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Make seq's newly full, computed blocks findable by their chain hash."""
        if not self.enable_prefix_caching:
            return
        # Computed and known: a placeholder's block waits until the token's id arrives.
        num_full_blocks = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        if num_full_blocks <= seq.num_hashed_blocks:
            return
        hashes = self._block_hashes(seq, num_full_blocks)
        for i in range(seq.num_hashed_blocks, num_full_blocks):
            block = self.blocks[seq.block_table[i]]
            # A block found by hash is registered already; an identical block computed
            # by someone else first stays private (the map keeps the first).
            if block.block_hash is None and hashes[i] not in self.cached_block_map:
                start = i * self.block_size
                block.block_hash = hashes[i]
                block.token_ids = tuple(seq.token_ids[start:start + self.block_size])
                self.cached_block_map[hashes[i]] = block.block_id
        seq.num_hashed_blocks = num_full_blocks

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count an admission's prefix-cache lookup toward the hit rate."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_query_tokens
            self.prefix_cache_hits += num_hit_tokens

    # ---- reporting -----------------------------------------------------------------------

    def block_tables(self) -> dict[int, list[int]]:
        """seq_id -> block table, for every sequence that holds blocks (the visualizer's block map)."""
        return {seq_id: list(seq.block_table) for seq_id, seq in self.owners.items()}

    def usage(self) -> KVCacheUsage:
        filled: dict[int, int] = {}   # block id -> computed tokens in it (the most any of its users computed)
        block_size = self.block_size
        for seq in self.owners.values():
            table = seq.block_table
            num_full, in_last = divmod(min(seq.num_computed_tokens, len(table) * block_size), block_size)
            filled.update(dict.fromkeys(table[:num_full], block_size))   # whole blocks, in C: stats stay cheap
            if num_full < len(table):
                filled[table[num_full]] = max(filled.get(table[num_full], 0), in_last)
                for block_id in table[num_full + 1:]:   # reserved, nothing computed (the naive policy)
                    filled.setdefault(block_id, 0)
        used = sum(filled.values())
        live_slots = len(filled) * self.block_size
        return KVCacheUsage(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            used_slots=used,
            fragmentation_slots=live_slots - used,
            free_slots=self.num_free_blocks * self.block_size,
            free_blocks=self.num_free_blocks,
            cached_free_blocks=len(self.cached_free_block_ids),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )

    # ---- internals -----------------------------------------------------------------------

    def _take_free_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:
            block_id, _ = self.cached_free_block_ids.popitem(last=False)   # evict the least recently freed
            block = self.blocks[block_id]
            del self.cached_block_map[block.block_hash]
            block.block_hash = block.token_ids = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq.block_hashes extended to cover its first `num_blocks` full blocks."""
        hashes = seq.block_hashes
        for i in range(len(hashes), num_blocks):
            start = i * self.block_size
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None,
                                            seq.token_ids[start:start + self.block_size]))
        return hashes
