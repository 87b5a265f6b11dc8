"""The data stage: Hub download, CaseOps, tokenizer, shards, preparation and verification."""
