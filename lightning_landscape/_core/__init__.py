"""The foundation every floor of the package stands on (pure torch, no Lightning).

- :mod:`.vectors`: the parameters a quantity is taken with respect to, flat vectors, and
  :class:`~.vectors.ParamVector` (flat get/set with bit-exact restore);
- :mod:`.batches`: batch sizes and batch-weighted means over fixed batches, reduced across ranks
  (:func:`~.batches.mean_gradient`, :func:`~.batches.mean_value`);
- :mod:`.random`: the one seed rule (:func:`~.random.derive_seed`), generators and probes;
- :mod:`.distributed`: the collectives (sums and counts, never averages);
- :mod:`.checks`: the argument checks (``TypeError``/``ValueError`` naming the argument);
- :mod:`.stats`: Student's t quantiles, for error bars estimated from few samples;
- :mod:`.space`: the vectors an algorithm holds and how they are measured (inner products,
  norms, random draws), whole or sharded;
- :mod:`.sharding`, :mod:`.fsdp` and :mod:`.fsdp1`: shards of FSDP2 and FSDP (v1) modules
  (their layout in the whole vector, the :class:`~.sharding.ShardedSpace`), passes through a
  sharded module (mean losses, gradients), and FSDP (v1)'s pieces, resharding and forward.

Every other subpackage may import these modules; they import nothing above them.
"""
