"""Data: corpora -> llm.c token shards (prepare), the shard loader, the text-file cache with its seeded batches."""
