"""What a run is and does: its config (:mod:`~bctkit.run.config`), run keys
(:mod:`~bctkit.run.keys`), the checks made before anything trains (:mod:`~bctkit.run.prechecks`),
the old-feature cache (:mod:`~bctkit.run.cache`), the benchmark run (:mod:`~bctkit.run.benchmark`),
the upgrade run (:mod:`~bctkit.run.upgrade`), the choice between them (:mod:`~bctkit.run.launch`:
``run_pipeline``, ``run_scenarios``), the packaged configs (``configs/``) and the aggregate of
repeated runs (:mod:`~bctkit.run.aggregate`)."""
