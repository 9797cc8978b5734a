"""The NBD client: a sans-IO protocol core (:mod:`.client`) and the ``nbd`` driver (:mod:`.driver`)."""
