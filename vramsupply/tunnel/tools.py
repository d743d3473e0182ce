"""The tunnel programs `serve --tunnel` can run, and how to read each one's public URL.

We write no tunnel code of our own: an existing tool makes the public URL and carries the traffic;
we only start it, read the URL it prints, and tell the user how to install it when it is missing.
Cloudflare's quick tunnels need no account: ``cloudflared tunnel --url http://localhost:PORT``
prints a box with a random ``https://….trycloudflare.com`` address.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

from vramsupply.tunnel.errors import TunnelError


@dataclass(frozen=True)
class TunnelTool:
    name: str
    executable: str
    url_pattern: re.Pattern[str]
    install_hint: str
    args: tuple[str, ...]

    def command(self, local_url: str) -> list[str]:
        """The full command line for a tunnel to ``local_url``; ``TunnelError`` when the tool is missing."""
        path = shutil.which(self.executable)
        if path is None:
            raise TunnelError(f"--tunnel {self.name}: `{self.executable}` is not installed or not on PATH. {self.install_hint}")
        return [path, *(arg.format(local_url=local_url) for arg in self.args)]

    def public_url(self, line: str) -> str | None:
        """The public URL in one line of the tool's output, if the line announces it."""
        match = self.url_pattern.search(line)
        return match.group(0).lower() if match else None


CLOUDFLARED = TunnelTool(
    name="cloudflared",
    executable="cloudflared",
    # The quick-tunnel box line. The API host it asks for a tunnel (api.trycloudflare.com) also
    # appears in its error lines and is never our URL. The host must end there: at a space, the
    # end of the line, a path, a quote or the box's border. A word boundary also matched before
    # ".", "-", ":", "@" or "%": "https://x.trycloudflare.com.evil.example" (or "@evil.example")
    # was registered as a trycloudflare address. A quick tunnel has no port: one with a port is
    # not its URL, and is ignored.
    url_pattern=re.compile(r"https://(?!api\.)[a-z0-9][a-z0-9-]*\.trycloudflare\.com(?=[\s/?#|\"']|$)", re.IGNORECASE),
    install_hint=(
        "Install it from https://developers.cloudflare.com/cloudflare-one/connections/connect-networks/downloads/ "
        "(Debian/Ubuntu: the cloudflared .deb from https://github.com/cloudflare/cloudflared/releases, "
        "then `sudo dpkg -i cloudflared-linux-amd64.deb`; macOS: `brew install cloudflared`); no Cloudflare account is needed."
    ),
    args=("tunnel", "--no-autoupdate", "--url", "{local_url}"),
)

TOOLS = {tool.name: tool for tool in (CLOUDFLARED,)}


def tunnel_tool(name: str) -> TunnelTool:
    try:
        return TOOLS[name.lower()]
    except KeyError:
        raise TunnelError(f"--tunnel {name!r} is not a tunnel tool vramsupply knows; choose one of: {', '.join(TOOLS)}") from None
