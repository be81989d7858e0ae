"""A lying volunteer for the attack tests: the real client, whose pseudo-gradient is forged.

    python -m harness.attacker --signflip 10 -- join --run RUN --client-id liar ...

runs ``asyncloco-client`` with the given arguments, except that every round's delta is the honest
one times −10 before it is encoded and sent (everything else, the signed snapshots, the codec,
the sequence numbers, is the real client's). The simulator's attackers are
:mod:`coordinator.sim.attacks`; this one exists to attack real processes through the real broker
and the real intake. Never part of the client itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from client.cli import main as client_main
from shared.local_round import LocalTrainer


def forge(scale: float) -> Callable[[LocalTrainer], dict[str, torch.Tensor]]:
    """A ``pseudo_gradient`` that returns the honest one times ``scale``."""
    honest = LocalTrainer.pseudo_gradient

    def forged(self: LocalTrainer, **how: bool) -> dict[str, torch.Tensor]:
        return {name: g * scale for name, g in honest(self, **how).items()}

    return forged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signflip", type=float, required=True, metavar="K",
                        help="send the honest delta times -K")
    parser.add_argument("client_args", nargs=argparse.REMAINDER, help="-- then asyncloco-client's arguments")
    args = parser.parse_args(argv)
    rest = args.client_args[1:] if args.client_args[:1] == ["--"] else args.client_args
    LocalTrainer.pseudo_gradient = forge(-args.signflip)  # type: ignore[method-assign,assignment]
    client_main.main(args=rest, prog_name="asyncloco-client")  # a click group: exits with its code


if __name__ == "__main__":
    main()
