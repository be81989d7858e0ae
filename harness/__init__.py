"""Machinery that tests and benchmarks share: real processes, the fault helpers, the oracle.

It sits on top of the product (it may import ``shared``, ``coordinator`` and ``client``); nothing
in those imports it. Installed with the distribution so that ``tests/`` and ``benchmarks/`` import
it normally, from any directory:

* :mod:`harness.processes`: start processes and stop exactly those, wait for a condition, the test
  servers' URLs, starting Redis/RabbitMQ when they are not running;
* :mod:`harness.faults`: the fault tests' coordinator and client command lines, and probes of a
  run (status, snapshot check, queue depth, closing the coordinator's broker connection);
* :mod:`harness.oracle`: the clients' journals of confirmed deltas against the coordinator's
  applied log: lost, applied twice, applied unconfirmed.
"""
