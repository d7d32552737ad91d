"""``dicom-node serve [--config node.yaml]``: run the node (:mod:`node.service`) until
SIGTERM/SIGINT; prints ``dicom-node: listening as <AE> on port <port>, storage <dir>`` once listening,
then where the console is and how to log in.
"""

from __future__ import annotations

import argparse
import logging

from node.config import load_config
from node.logsafe import set_log_phi


def _cmd_serve(args: argparse.Namespace) -> int:
    from node.service import NodeService

    cfg = load_config(args.config)
    if args.port is not None:
        cfg.port = args.port
    if args.http_port is not None:
        cfg.http.port = args.http_port
    set_log_phi(cfg.log_phi)
    level = (args.log_level or cfg.log_level).upper()
    logging.getLogger().setLevel(getattr(logging, level, logging.INFO))
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))

    def ready(svc: NodeService) -> None:
        print(f"dicom-node: listening as {cfg.ae_title} on port {svc.port}, storage {cfg.storage}", flush=True)
        console = svc.console
        if console is None:
            why = "http.enabled: false" if not cfg.http.enabled else "it did not start, see the log"
            print(f"dicom-node: console off ({why})", flush=True)
        elif console.first_admin_password is not None:
            print(f"dicom-node: console at {console.url}: log in as 'admin' with the one-time password in the log"
                  " above; you will be asked to choose a new one", flush=True)
        else:
            print(f"dicom-node: console at {console.url}: log in with a console user"
                  " (`dicom-node users list`, `dicom-node users add NAME --role admin`)", flush=True)

    NodeService(cfg).run_forever(on_ready=ready)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the node: receive, route, segment, dispatch")
    p.add_argument("--config", "-c", default=None, metavar="FILE", help="node.yaml (default: embedded defaults)")
    p.add_argument("--port", type=int, default=None, help="override the listening port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=None, help="override the console port http.port (0 = any free port)")
    p.set_defaults(func=_cmd_serve)
