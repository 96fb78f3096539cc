"""``upvoot console-url``: the console's address with the operator token in its fragment.

Prints ``http[s]://HOST:PORT/console/#token=TOKEN`` (the admin listener's
address; a wildcard interface is printed as 127.0.0.1). The fragment never
leaves the browser: the page posts the token once to log in and removes
it from the address bar. The token file is created (mode 0600) if the
daemon has not made it yet, so the URL works from the daemon's first start.
"""

from __future__ import annotations

import argparse
from typing import Any

from upvoot.console import address
from upvoot.console.auth import ConsoleSetupError, check_console, load_token, token_path


def add_commands(commands: Any) -> None:
    p = commands.add_parser(
        "console-url", help="print the browser console's URL (it holds the operator token: keep it private)",
        description="Print the URL of the console on the admin listener, with the operator token in its fragment.",
    )
    p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help="the daemon's ini file")
    p.set_defaults(handler=console_url)


def console_url(args: argparse.Namespace, config: Any) -> int:
    from upvoot.cli import EXIT_USAGE, CommandError

    if not config.console:
        raise CommandError(f"{config.path}: [upvoot] console: the console is off (console = no)", EXIT_USAGE)
    if not config.admin_listen:
        raise CommandError(f"{config.path}: [upvoot] admin_listen: empty, so there is no console", EXIT_USAGE)
    url = address.admin_url(config.admin_listen)
    if url is None:
        raise CommandError(f"{config.path}: [upvoot] admin_listen: {config.admin_listen!r} is not a TCP or TLS port"
                           " a browser can open", EXIT_USAGE)
    try:
        check_console(config)
        token = load_token(token_path(config), f"{config.path}: [upvoot] admin_token_file")
    except ConsoleSetupError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    print(f"{url}#token={token}")
    return 0
