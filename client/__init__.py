"""The volunteer's side of asyncloco: join a run, train local rounds, send pseudo-gradients.

Run N rounds in-process (tests, demos, the simulator's checks)::

    from client.config import ClientConfig
    from client.worker import Worker

    config = ClientConfig(run="demo", client_id="alice", state_dir=tmp_path, threads=1, max_rounds=2,
                          coordinator_key=KEY_HEX)  # `asyncloco-coordinator key --run demo` prints it
    with Worker(config) as worker:
        summary = worker.run(on_round=lambda report: print(report.line()))

From a shell: ``asyncloco-client join --run demo`` (see ``asyncloco-client join --help``).
The client imports only from ``shared``, never from ``coordinator``.
"""
