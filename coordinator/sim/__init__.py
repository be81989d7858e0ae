"""The virtual-clock simulator: W workers in one process running the project's real round, codec
and outer optimizer, with simulated time.

- :mod:`coordinator.sim.simulator` the simulation (:class:`~coordinator.sim.simulator.SimConfig`,
  :class:`~coordinator.sim.simulator.Simulation`, speed profiles);
- :mod:`coordinator.sim.report`    its output: a CSV of every curve point and a PNG;
- :mod:`coordinator.sim.cli`       the ``asyncloco-coordinator simulate`` command.

Nothing is imported here, so that the coordinator's command line starts without loading torch.
"""
