"""`serve --tunnel`: a public URL for an agent behind NAT, made by an existing tunnel tool we supervise.

The tunnel knows nothing of the platform: it reports each new public URL through a callback, and
the serve lifecycle hands it to the marketplace session, which registers again.
"""

from vramsupply.tunnel.errors import TunnelError
from vramsupply.tunnel.supervisor import TunnelSupervisor
from vramsupply.tunnel.tools import TOOLS, TunnelTool, tunnel_tool

__all__ = ["TOOLS", "TunnelError", "TunnelSupervisor", "TunnelTool", "tunnel_tool"]
