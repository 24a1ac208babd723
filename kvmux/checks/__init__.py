"""The kernels' checks, shipped so that `python -m bench.cpu_check` can run them on any host: float64
references and fresh random inputs (`reference`), and one check per CPU kernel variant with the error its
arithmetic allows (`kernels`). The suite runs the same checks. Nothing of the engine imports this package."""
