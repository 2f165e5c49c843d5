"""The command line of provisioning: ``fedmq broker init``, ``broker add-site``, ``device add``."""

from __future__ import annotations

import argparse
from pathlib import Path

from aggregator.ops.bridge import SiteUplink, parse_upstream
from aggregator.ops.provision import broker_init, device_add
from aggregator.ops.sites import site_add
from shared.protocol.topics import TopicError

# MQTT over secure WebSockets: 8884 by the custom of public brokers (MQTT over TLS 8883,
# MQTT over WebSockets 8080/8083); IANA assigns no port to it.
DEFAULT_DASHBOARD_PORT = 8884


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``broker init`` and ``device add`` on the ``fedmq`` parser."""
    p_broker = sub.add_parser("broker", help="provision a TLS broker with credentials and ACL")
    b_sub = p_broker.add_subparsers(dest="broker_command", required=True)
    p_init = b_sub.add_parser("init", help="create CA, broker cert, identities, passwd, ACL, conf")
    p_init.add_argument("dir", type=Path)
    p_init.add_argument("--host", help="name or IP devices use to reach the broker (in the SAN)")
    p_init.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    p_init.add_argument("--bind", default="", help="listen on this address only (default: all)")
    p_init.add_argument(
        "--federation",
        help="federation of agent.toml files (default: default; a site: its bundle's)",
    )
    p_init.add_argument("--broker-user", help="account mosquitto runs as (default: you)")
    p_init.add_argument("--require-certificate", action="store_true", help="mutual TLS")
    p_init.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        help="port of the web dashboard's wss listener, which serves the page too "
        f"(default {DEFAULT_DASHBOARD_PORT}; the monitor's login only: docs/dashboard.md)",
    )
    p_init.add_argument(
        "--dashboard-page-port",
        type=int,
        help="port of the plain-HTTP listener serving the dashboard's page (no MQTT logins; "
        "default: --dashboard-port + 1)",
    )
    p_init.add_argument(
        "--no-dashboard", action="store_true", help="no dashboard listeners (MQTT over TLS only)"
    )
    p_init.add_argument(
        "--site", help="write a site broker bridged to the central one (docs/sites.md)"
    )
    p_init.add_argument(
        "--upstream", help="with --site: HOST:PORT of the central broker's TLS listener"
    )
    p_init.add_argument(
        "--uplink",
        type=Path,
        help="with --site: the site's bundle, `fedmq broker add-site NAME` on the central "
        "broker's directory wrote it in sites/NAME",
    )
    p_init.add_argument("--force", action="store_true", help="rotate existing keys and secrets")
    p_site = b_sub.add_parser(
        "add-site", help="a site's bridge login, certificate and ACL on the central broker"
    )
    p_site.add_argument("name", help="site name: its bridge's login on the central broker")
    p_site.add_argument("--dir", type=Path, required=True, help="the central `broker init` dir")
    p_site.add_argument("--force", action="store_true", help="rotate this site's secrets")
    p_device = sub.add_parser("device", help="provision devices")
    d_sub = p_device.add_subparsers(dest="device_command", required=True)
    p_add = d_sub.add_parser(
        "add", help="credentials, client certs and agent.toml for a device and its inference server"
    )
    p_add.add_argument(
        "name", help="device name: its username and client id (its inference server's: NAME-infer)"
    )
    p_add.add_argument("--dir", type=Path, required=True, help="the `broker init` directory")
    p_add.add_argument("--federation", help="federation (default: the one given to broker init)")
    p_add.add_argument("--install-dir", help="where the bundle will live on the device")
    p_add.add_argument("--force", action="store_true", help="rotate this device's secrets")


def run(args: argparse.Namespace) -> int:
    """Run ``broker init``, ``broker add-site`` or ``device add``; print the report; exit code."""
    try:
        if args.command == "broker" and args.broker_command == "add-site":
            report = site_add(args.dir, args.name, force=args.force)
        elif args.command == "broker":
            report = broker_init(
                args.dir,
                host=args.host,
                port=args.port,
                bind=args.bind,
                federation=args.federation,
                site=_site_uplink(args),
                run_as=args.broker_user,
                require_certificate=args.require_certificate,
                dashboard_port=None if args.no_dashboard else args.dashboard_port,
                dashboard_page_port=None if args.no_dashboard else args.dashboard_page_port,
                force=args.force,
            )
        else:
            report = device_add(
                args.dir,
                args.name,
                federation=args.federation,
                install_dir=args.install_dir,
                force=args.force,
            )
    except (ValueError, TopicError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    print("\n".join(report.lines()))
    return 0


def _site_uplink(args: argparse.Namespace) -> SiteUplink | None:
    """``--site``, ``--upstream`` and ``--uplink``: all three or none."""
    given = {"--site": args.site, "--upstream": args.upstream, "--uplink": args.uplink}
    if not any(v is not None for v in given.values()):
        return None
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise ValueError(f"a site broker needs --site, --upstream and --uplink: missing {missing}")
    return SiteUplink(args.site, parse_upstream(args.upstream), args.uplink.resolve())
