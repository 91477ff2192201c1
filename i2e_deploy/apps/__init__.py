"""The commands' library functions (parity, benchmark, stream + demo, val): the top layer,
above :mod:`i2e_deploy.targets`, called by :mod:`i2e_deploy.cli`."""
