"""Data: MovieLens loaders, synthetic catalogs, and batching into ``KeyedJaggedTensor``.

Modules are imported on demand: importing this package imports no torch, so fetching stays cheap.


* :mod:`~silvertorch.data.fetch` — cache location and ``python -m silvertorch.data.fetch``
* :mod:`~silvertorch.data.dataset` — ``EntityTable``, ``Interactions``, ``RecDataset``, the split
* :mod:`~silvertorch.data.movielens` — ``load_movielens_100k``, ``load_movielens_small``
* :mod:`~silvertorch.data.synthetic` — ``generate_catalog``, ``make_queries``,
  ``random_filter_expressions``, ``generate_interactions``
* :mod:`~silvertorch.data.batching` — ``Batch``, ``features_to_kjt``, ``InteractionLoader``,
  ``all_items_kjt``
"""
