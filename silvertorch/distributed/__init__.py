"""The sharded twins of the model and the index, on PyTorch's own distributed engine.

Training (``torch.distributed`` + TorchRec ``DistributedModelParallel`` + DCP; docs/distributed.md):
``process_group`` (init from the torchrun / torchx environment), ``topology`` (the TorchRec
``Topology``, shared with the placement planner), ``sharding`` (constraints, plan, DMP),
``two_tower`` (the global-batch loss), ``collectives``, ``state`` (whole weights in and out of
shards), ``dcp`` (atomic, resharding checkpoints).
Serving: ``sharded_index`` / ``sharded_retrieval`` (the index split by items across ranks).
Import the submodules directly; this package imports nothing.
"""
