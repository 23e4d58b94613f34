"""The KV-Pool Serve application. `serve run app:deployment [key=value ...]` builds it from a KVPoolConfig."""

from app.builder import build_app as deployment

__all__ = ["deployment"]
