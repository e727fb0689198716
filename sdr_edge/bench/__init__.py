"""End-to-end measurements that answer the project's questions (the paper's claim)."""
