"""How a run is held together: config, torchrun / FSDP2, run state and crash recovery, trackers,
the memory plan (``python -m sdpo.runtime.memory``)."""
