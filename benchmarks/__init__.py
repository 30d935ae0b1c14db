"""jaxbn's benchmarks and HLO analysis: ``python -m benchmarks [layer|model|collectives]``.

Not imported by ``import jaxbn``. Modules, one job each:

* `grid`: the layer shapes, model configurations, placements and dtypes;
* `timing`: interleaved repetitions, medians, the bandwidth probe, the progress bar;
* `hlo`: what a compiled program costs, read off its optimized HLO (collectives,
  kernels, full-size passes, bytes accessed, temp bytes): the one HLO analysis;
* `layers` and `layer`: one batch-norm layer per library, and the layer benchmark;
* `resnet` and `model`: ResNet training steps with the batch norm swapped, and
  the whole-model benchmark;
* `collectives`: collectives of synchronized steps, child processes with
  simulated devices;
* `report` and `plot`: tables (text, Markdown) and charts.
"""
