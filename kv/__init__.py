"""KV block pool and prefix cache: pure Python over block ids."""

from kv.block_pool import BlockPool, NoFreeBlocks
from kv.hashing import BlockHash, block_hashes, extend_block_hashes, hash_block, tenant_salt
from kv.manager import Allocation, CacheStats, KVCacheManager, PrefixProbe

__all__ = [
    "Allocation",
    "BlockHash",
    "BlockPool",
    "CacheStats",
    "KVCacheManager",
    "NoFreeBlocks",
    "PrefixProbe",
    "block_hashes",
    "extend_block_hashes",
    "hash_block",
    "tenant_salt",
]
