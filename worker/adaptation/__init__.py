"""The adaptation engine: pure PyTorch, no HTTP, no database, no Celery.

Importing this package does not import torch: `catalog` (method names, kinds and typed params) is
shared with the torch-free API. Everything that needs torch lives in the sub-modules.
"""
