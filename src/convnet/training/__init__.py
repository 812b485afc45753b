"""The parts of a training run, put together by :class:`convnet.trainer.Trainer`: the run directory
(:mod:`.rundir`), what a run is built from (:mod:`.inputs`: devices, dataset, loaders), the epoch loop (:mod:`.loop`),
the test-set evaluation (:mod:`.evaluation`), what it reports (:mod:`.report`: log lines, log.jsonl records,
progress, plots) and its reductions over data-parallel ranks (:mod:`.ranks`)."""
