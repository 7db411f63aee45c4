"""Virtual context management (MemGPT): the context window is main memory,
recall and archival storage are the disk, and memory functions page between them.
"""

from llmos.memory.archival import ArchivalError, ArchivalStorage, IVFIndex, Passage
from llmos.memory.context import (
    DEFAULT_SYSTEM,
    ContextConfig,
    ContextError,
    MainContext,
    Pressure,
    event,
    to_chat,
)
from llmos.memory.core import DEFAULT_BLOCK_LIMIT, Block, CoreMemory, CoreMemoryError
from llmos.memory.embeddings import Embedder, EmbeddingError, MiniLMEmbedder, default_embedder
from llmos.memory.recall import Message, Page, RecallError, RecallStorage
from llmos.memory.store import MemoryStore, open_store

__all__ = [
    "DEFAULT_BLOCK_LIMIT", "DEFAULT_SYSTEM", "ArchivalError", "ArchivalStorage", "Block", "ContextConfig",
    "ContextError", "CoreMemory", "CoreMemoryError", "Embedder", "EmbeddingError", "IVFIndex", "MainContext",
    "MemoryStore", "Message", "MiniLMEmbedder", "Page", "Passage", "Pressure", "RecallError", "RecallStorage",
    "default_embedder", "event", "open_store", "to_chat",
]
