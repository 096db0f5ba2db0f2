"""The speed and memory benchmark, by job (``benchmarks/speed_memory.py`` is its command line):

* ``configs``: the UNet configurations and the rows (one change each from the paper's baseline);
* ``estimates``: the memory a row needs, before it runs;
* ``builders``: the models, with seeded random weights (diffusers, or the host's own classes);
* ``diffusers_worker`` / ``host_worker``: one stage in a worker process, through the project's code;
* ``measure``: what a worker measures, and the parent's watch over a worker;
* ``report``: ratios, the table, the JSON, merged runs.
"""
