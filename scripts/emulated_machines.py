"""Run a command on emulated machines (``distnn.testbed``): N network namespaces with their own IPs on a
bridge, links shaped to a rate both ways, a Ray node in each; the command runs on machine 0 with
RAY_ADDRESS and the cluster's token set, and everything is removed when it ends (also on Ctrl-C).
Needs root.

    sudo python scripts/emulated_machines.py [--machines 2] [--rate 1gbit] [--cpus 1] [--hide 1:datasets] \
        -- distnn train --workers 2 --epochs 1

Prints each machine's address and, at the end, the bytes each interface sent and received.
``--cleanup`` removes what a run killed with SIGKILL left behind, and exits.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from distnn import testbed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=2)
    ap.add_argument("--rate", default="1gbit", help="each machine's link, both ways (tc's units: 100mbit, 1gbit)")
    ap.add_argument("--cpus", type=int, default=1, help="CPUs of each machine's Ray node")
    ap.add_argument("--hide", action="append", default=[], metavar="I:FOLDER",
                    help="machine I does not see FOLDER (an empty folder in its place); repeatable")
    ap.add_argument("--cleanup", action="store_true", help="remove what killed runs left, then exit")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="after --: what to run on machine 0")
    args = ap.parse_args(argv)
    why = testbed.unavailable()
    if why:
        print(f"emulated_machines: {why}", file=sys.stderr)
        return 2
    if args.cleanup:
        gone = testbed.remove_stale()
        print(f"removed {len(gone)} namespace(s) of killed runs{': ' if gone else ''}{', '.join(gone)}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    hide = {}
    for item in args.hide:
        index, _, folder = item.partition(":")
        if not index.isdigit() or not folder or int(index) >= args.machines:
            ap.error(f"--hide {item!r}: write I:FOLDER with I a machine index below {args.machines}")
        hide.setdefault(int(index), []).append(folder)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM cleans up as Ctrl-C does
    try:
        with testbed.Machines(args.machines, rate=args.rate, cpus=args.cpus, hide=hide) as m:
            for i, ip in enumerate(m.ips):
                print(f"machine {i}: {ip} (namespace {m.namespaces[i]}){' head ' + m.address if i == 0 else ''}")
            proc = m.popen(0, command)
            code = proc.wait()
            for i, c in enumerate(m.counters()):
                print(f"machine {i}: sent {c['tx_bytes']:,} bytes, received {c['rx_bytes']:,} bytes")
            return code
    except KeyboardInterrupt:
        print("interrupted: machines removed", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, subprocess.SubprocessError) as e:
        print(f"emulated_machines: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
