"""The SilverTorch server: ``silvertorch serve ARTIFACT`` (see docs/serving.md).

FastAPI + uvicorn in front of one model-owner thread (:mod:`serve.engine`) that micro-batches
retrieval requests into single forward passes of the artifact's ``RetrievalModel`` and applies
streaming item updates between batches; a durable update log (:mod:`serve.update_log`),
compaction snapshots (:mod:`serve.snapshot`) and hot swap of artifacts. Imports ``silvertorch``
only (an artifact is all it needs), never ``train``.
"""
