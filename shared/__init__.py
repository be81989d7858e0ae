"""What the coordinator and the clients must agree on.

Wire protocol and limits, snapshot layout and key names, delta codecs, tasks (model, data, eval),
the local training round itself, connection settings and the retry policy. Nothing in here imports
from ``coordinator`` or ``client``.
"""

# 2: the round plan carries one `mode` instead of sync/dylu/warm_start flags; 3: a snapshot's Redis
# keys carry a cluster hash tag (shared/keys.py), so a protocol-2 peer cannot find them; 4: verdicts
# are a stream per client that names the snapshot holding an applied delta (shared/verdict.py)
PROTOCOL_VERSION = 4
