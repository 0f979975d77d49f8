"""The merges users run: in memory (``in_memory.py``), during training (``periodic.py``) and
file to file (``files.py``, through the CPU pipeline ``cpu_pipeline.py`` or the GPU one
``gpu_pipeline.py``), all with the options of ``options.py``."""
