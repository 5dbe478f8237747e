"""Quality metrics of explanation maps: pure, batched JAX functions in six families
(``faithful``, ``robust``, ``localise``, ``complexity``, ``randomise``, ``axioms``), each
declared once (`convlens.kernels.metrics.spec.MetricSpec`) and assembled in
`convlens.kernels.metrics.registry`. `convlens.evaluate` runs one on a batch from Python;
`convlens audit --quality` over a store, against two controls."""
