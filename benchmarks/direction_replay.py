"""The guard's direction check on the cosines of a real run: honest deltas refused, and the same
deltas sign-flipped (the flipper stopped), with and without forgiveness.

Reads the "delta of SENDER: cosine C to the server's momentum" lines a coordinator logs at debug
level (coordinator/guard.py), and replays them in order through the guard's own direction check
(coordinator/direction.py) for each ``--forgive-after``: once as they came (every sender honest),
then once per sender with that sender's cosines negated (its deltas sign-flipped, the others as
they came). A replay, not a rerun: a refused delta would have left the momentum, and so the
cosines after it, a little different in the real run.

    ASYNCLOCO_LOG_LEVEL=debug make demo
    python benchmarks/direction_replay.py .asyncloco/demo/coordinator.log
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import Counter
from pathlib import Path

from table_csv import write_rows

from coordinator.direction import REFUSE, DirectionCheck
from coordinator.guard import GuardConfig

LINE = re.compile(r"delta of (\S+): cosine (-?[0-9.]+) to the (server's momentum|senders' reference)")


def replay(cosines: list[tuple[str, float, bool]], forgive_after: int, spread: float, min_cosine: float,
           flipped: str | None = None) -> Counter[str]:
    """Refusals per sender of ``cosines`` (sender, cosine) judged in order; ``flipped``'s negated.
    The deltas not refused count as accepted (as in the guard, whose other rules refused none of
    these deltas in the runs measured)."""
    check = DirectionCheck(min_cosine, forgive_after, Counter(), spread=spread, window=GuardConfig.window)
    refused: Counter[str] = Counter()
    for sender, cosine, by_reference in cosines:
        check.judge_by(by_reference)
        cosine = -cosine if sender == flipped else cosine
        if check.judge(sender, cosine) == REFUSE:
            refused[sender] += 1
        else:
            check.accepted(cosine)
    return refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="a coordinator log written at --log-level debug")
    parser.add_argument("--forgive-after", default=f"0,{GuardConfig.forgive_after}",
                        help="comma list of --guard-forgive-after values to replay")
    parser.add_argument("--spread", default=f"0,{GuardConfig.direction_spread:g}",
                        help="comma list of --guard-direction-spread values to replay")
    parser.add_argument("--min-cosine", type=float, default=GuardConfig.min_cosine)
    parser.add_argument("--out", type=Path, default=Path("results/direction_replay.csv"))
    args = parser.parse_args()
    if not args.log.is_file():
        parser.error(f"no such log: {args.log}")
    try:
        forgive = [int(v) for v in args.forgive_after.split(",") if v.strip()]
        spreads = [float(v) for v in args.spread.split(",") if v.strip()]
    except ValueError:
        parser.error("--forgive-after and --spread take comma lists of numbers")
    cosines = [(m[1], float(m[2]), m[3] == "senders' reference") for m in LINE.finditer(args.log.read_text())]
    if not cosines:
        parser.error(f"{args.log} has no cosine lines: was the coordinator's log level debug?")
    sent = Counter(sender for sender, _, _ in cosines)
    print(f"{len(cosines)} deltas judged for direction in {args.log} "
          f"({', '.join(f'{s} {n}' for s, n in sorted(sent.items()))})")
    values = [c for _, c, _ in cosines]
    print(f"median cosine of the first 64: {statistics.median(values[:64]):.3f}, of the last 64: "
          f"{statistics.median(values[-64:]):.3f}; lowest {min(values):.3f}; below --min-cosine "
          f"{sum(c < args.min_cosine for c in values)}")
    print(f"{'forgive after':>13} {'spread':>6} {'honest refused':>15}  "
          + "  ".join(f"{s + ' flipped, stopped':>28}" for s in sorted(sent)))
    rows = []
    for k, spread in ((k, spread) for spread in spreads for k in forgive):
        honest = sum(replay(cosines, k, spread, args.min_cosine).values())
        stopped = {s: replay(cosines, k, spread, args.min_cosine, flipped=s)[s] for s in sorted(sent)}
        print(f"{k:>13} {spread:>6g} {honest:>7} ({100 * honest / len(cosines):4.1f}%)  "
              + "  ".join(f"{f'{stopped[s]} of {sent[s]} ({100 * stopped[s] / sent[s]:.0f}%)':>28}"
                          for s in sorted(sent)))
        rows.append({"forgive_after": k, "spread": spread, "deltas": len(cosines), "honest_refused": honest,
                     **{f"{s}_flipped_stopped": stopped[s] for s in sorted(sent)},
                     **{f"{s}_deltas": sent[s] for s in sorted(sent)}})
    write_rows(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
