"""KV block pool and prefix cache: pure Python over block ids (the paged engine, issue 3)."""
