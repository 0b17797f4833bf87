"""OCI image indexer: layers to index and chunks."""
