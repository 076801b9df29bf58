"""The gallery on Milvus (pymilvus): Milvus Lite in a file, or a Milvus server or cluster."""
